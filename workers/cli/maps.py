"""`spsa-nas attention-map`: the SPSA paper's Fig. 3 for a model — per SPSA module, the input, the
attention weight and the output on one image — from a spec (+ weights) or a search's trial."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from workers.cli import UsageError
from workers.cli.common import (
    DEFAULT_ARTIFACTS,
    open_storage_arg,
    positive_float,
    resolve_study,
    storage_args,
)


def _from_files(args: argparse.Namespace) -> tuple[Any, Path | None, str]:
    from pydantic import ValidationError

    from spsa_nas.errors import format_validation_error
    from spsa_nas.spec import ArchSpec

    path = Path(args.spec)
    try:
        spec = ArchSpec.model_validate(json.loads(path.read_text()))
    except OSError as exc:
        raise UsageError(f"--spec {path}: cannot read it: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--spec {path}: not JSON: {exc}") from None
    except ValidationError as exc:
        raise UsageError(f"--spec {path}: {format_validation_error(exc)}") from None
    weights = Path(args.weights) if args.weights else None
    if weights is not None and not weights.is_file():
        raise UsageError(f"--weights {weights}: no such file")
    return spec, weights, path.name


def _from_study(args: argparse.Namespace, workdir: Path) -> tuple[Any, Path | None, str, Any]:
    from optuna.artifacts import FileSystemArtifactStore, download_artifact

    from search_spaces.keys import WEIGHTS_ARTIFACT_ATTR
    from search_spaces.study import select_best, study_config
    from spsa_nas.spec import ArchSpec

    study = resolve_study(open_storage_arg(args.storage, must_exist=True), args.study)
    try:
        trial = select_best(study, latency_budget_ms=args.latency_budget, trial_number=args.trial)
    except LookupError as exc:
        raise UsageError(str(exc.args[0])) from None
    spec = ArchSpec.model_validate(trial.user_attrs["spec"])
    artifact_id = trial.user_attrs.get(WEIGHTS_ARTIFACT_ATTR)
    weights = None
    if artifact_id:
        store = Path(args.artifacts)
        if not (store / artifact_id).exists():
            raise UsageError(f"weights artifact {artifact_id} of trial {trial.number} is not in {store}; "
                             "pass the --artifacts directory the search used")
        weights = workdir / "weights.safetensors"
        download_artifact(artifact_store=FileSystemArtifactStore(str(store)), file_path=str(weights),
                          artifact_id=artifact_id)
    return spec, weights, f"{study.study_name} trial {trial.number}", study_config(study)


def dataset_sample(cfg: Any, spec: Any, index: int) -> Any:
    """Image `index` of the search's validation split, as the model's input (1, C, H, W)."""
    from spsa_nas.attention_maps import validation_image

    try:
        return validation_image(cfg.dataset, spec, index)
    except IndexError as exc:
        raise UsageError(f"--{exc.args[0]}") from None


def run_attention_map(args: argparse.Namespace) -> int:
    """Draw the maps of the chosen model's SPSA modules on an image into --out (PNG)."""
    import tempfile

    from spsa_nas import build_model
    from spsa_nas.attention_maps import ImageError, attention_map_png, load_image

    if (args.spec is None) == (args.storage is None):
        raise UsageError("give --spec FILE (with --weights) or --storage URL (a search's trial)")
    if args.spec is None and args.weights is not None:
        raise UsageError("--weights goes with --spec; a search's trial brings its own")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the figure is a PNG; name it *.png")
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    with tempfile.TemporaryDirectory() as workdir:
        cfg = None
        if args.spec is not None:
            spec, weights, title = _from_files(args)
        else:
            spec, weights, title, cfg = _from_study(args, Path(workdir))
        try:
            model = build_model(spec, weights=weights)
        except (ValueError, OSError) as exc:
            raise UsageError(f"cannot load the weights into the model: {exc}") from None
        if args.image is not None:
            try:
                image = load_image(Path(args.image), in_channels=spec.in_channels, size=spec.input_size)
            except OSError as exc:
                raise UsageError(f"--image {args.image}: cannot read it: {exc.strerror}") from None
            except ImageError as exc:
                raise UsageError(f"--image {args.image}: {exc}") from None
            title += f" on {Path(args.image).name}"
        elif cfg is not None:
            image = dataset_sample(cfg, spec, args.sample)
            title += f" on {cfg.dataset.name} validation image {args.sample}"
        else:
            raise UsageError("give --image FILE (a PNG or JPEG); a dataset sample needs --storage")
        if weights is None:
            title += " (untrained weights)"
        try:
            png = attention_map_png(model, image, modules, title=title)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    print(f"wrote {out} ({len(png):,} bytes)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `attention-map` to the `spsa-nas` command."""
    p = subparsers.add_parser(
        "attention-map", help="draw what each SPSA module of a model attends to on an image (PNG)"
    )
    p.add_argument("--spec", default=None, help="an architecture spec (JSON), e.g. an export's spec.json")
    p.add_argument("--weights", default=None, help="its weights (safetensors or .pt), with --spec")
    storage_args(p)
    p.set_defaults(storage=None)  # no default storage here: --spec or --storage
    p.add_argument("--trial", type=int, default=None, help="with --storage: this trial (default: the best)")
    p.add_argument("--latency-budget", type=positive_float, default=None, help="ms, for the best")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact directory of the search")
    p.add_argument("--image", default=None, help="a PNG or JPEG image")
    p.add_argument("--sample", type=int, default=0,
                   help="with --storage and no --image: this image of the search's validation split")
    p.add_argument("--modules", default=None,
                   help="comma-separated blocks or modules, e.g. layer2.3 (default: every SPSA module)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.set_defaults(run=run_attention_map)


__all__ = ["dataset_sample", "register", "run_attention_map"]
