"""A coordinator in its own process (for the restart and cluster tests): run_search from JSON args."""

from __future__ import annotations

import functools
import json
import sys

from search_spaces.config import SearchConfig
from search_spaces.study import create_study
from workers.ray_runner import RunnerOptions, run_search
from workers.synthetic import synthetic_trial


def main(argv: list[str]) -> None:
    args = json.loads(argv[1])
    cfg = SearchConfig.model_validate(args["cfg"])
    synthetic = args.get("synthetic")
    trial_fn = functools.partial(synthetic_trial, **synthetic) if synthetic is not None else None
    create_study(cfg, args["storage_url"])  # or resume it: what the CLI does before a run
    report = run_search(cfg.study_name, args["storage_url"], artifact_dir=args["artifact_dir"],
                        ray_address=args.get("ray_address"), trial_fn=trial_fn,
                        options=RunnerOptions(**args.get("options", {})))
    print("SUMMARY " + report.to_json(), flush=True)


if __name__ == "__main__":
    main(sys.argv)
