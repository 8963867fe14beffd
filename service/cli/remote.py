"""`spsa-nas remote ...`: a client of a running server over HTTP (submit, status, cancel, best, download,
compare, remeasure)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from workers.cli import UsageError

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers: Any) -> None:
    remote = subparsers.add_parser("remote", help="talk to a running spsa-nas server over HTTP")
    remote_sub = remote.add_subparsers(dest="remote_command", required=True)
    submit = remote_sub.add_parser("submit", help="submit a search from a JSON or YAML file ('-': stdin)")
    submit.add_argument("file")
    status = remote_sub.add_parser("status", help="a search's status and progress (no id: list searches)")
    status.add_argument("id", nargs="?")
    cancel = remote_sub.add_parser("cancel", help="cancel a search")
    cancel.add_argument("id")
    best = remote_sub.add_parser(
        "best", help="the best architecture of a search (spec and metrics as JSON; whether it is tied, "
                     "in words on stderr)")
    best.add_argument("id")
    best.add_argument("--accuracy-tolerance", type=float, default=None,
                      help="validation-accuracy differences within this are noise (one seed per trial; "
                           "default: the server's)")
    download = remote_sub.add_parser("download", help="download the best spec, weights or ONNX file")
    download.add_argument("id")
    download.add_argument("what", choices=("spec", "weights", "onnx"))
    download.add_argument("-o", "--output", help="file to write (default: <id>-trial<N>.<ext> here)")
    compare = remote_sub.add_parser(
        "compare", help="a search's completed trials by choice (SPSA vs NL vs GC, reverse, similarity)")
    compare.add_argument("id")
    compare.add_argument("--json", action="store_true", help="print JSON")
    remeasure = remote_sub.add_parser(
        "remeasure", help="re-measure a finished search's finalists together (watch `status ID`)")
    remeasure.add_argument("id")
    for sub in (best, download):
        sub.add_argument("--latency-budget-ms", type=float, help="the best trial under this latency")
        sub.add_argument("--trial", type=int, help="this trial number instead of the best")
    for sub in (submit, status, cancel, best, download, compare, remeasure):
        sub.add_argument(
            "--url",
            default=os.environ.get("SPSA_NAS_URL", DEFAULT_URL),
            help="the server (SPSA_NAS_URL; default %(default)s)",
        )
        sub.add_argument("--token", default=None, help="API token (default: $SPSA_NAS_TOKEN)")
        sub.set_defaults(run=_remote)


def _client(args: argparse.Namespace) -> Any:
    import httpx

    token = args.token or os.environ.get("SPSA_NAS_TOKEN")
    if not token:
        raise UsageError("no token: pass --token or set SPSA_NAS_TOKEN (from `spsa-nas users add NAME`)")
    return httpx.Client(
        base_url=args.url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=120
    )


def _check(response: Any) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:500]
        if isinstance(detail, list):
            detail = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail
            )
        raise UsageError(f"HTTP {response.status_code}: {detail}")
    return response


def _read_body(path: str) -> Any:
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    try:
        return yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: neither JSON nor YAML: {exc}") from None


def _remote(args: argparse.Namespace) -> int:
    import httpx

    try:
        with _client(args) as client:
            return _remote_call(args, client)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach {args.url}: {exc}") from None


def _remote_call(args: argparse.Namespace, client: Any) -> int:
    command = args.remote_command
    base = "/api/v1/searches"
    if command == "submit":
        print(json.dumps(_check(client.post(base, json=_read_body(args.file))).json(), indent=2))
    elif command == "status":
        path = f"{base}/{args.id}" if args.id else base
        print(json.dumps(_check(client.get(path)).json(), indent=2))
    elif command == "cancel":
        print(json.dumps(_check(client.post(f"{base}/{args.id}/cancel")).json(), indent=2))
    elif command == "remeasure":
        print(json.dumps(_check(client.post(f"{base}/{args.id}/remeasure")).json(), indent=2))
    elif command == "compare":
        summary = _check(client.get(f"{base}/{args.id}/compare")).json()
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            from rich.console import Console

            from workers.cli.compare import print_tables

            print_tables(summary, Console())
            if not summary.get("finished", True):
                print(f"the search is {summary.get('status')}: these are its trials completed so far")
    else:
        params = {
            k: v
            for k, v in (("latency_budget_ms", args.latency_budget_ms), ("trial", args.trial))
            if v is not None
        }
        if command == "best" and args.accuracy_tolerance is not None:
            params["accuracy_tolerance"] = args.accuracy_tolerance
        best = _check(client.get(f"{base}/{args.id}/best", params=params)).json()
        if command == "best":
            print(json.dumps(best, indent=2))
            _print_tie(best)
            return 0
        ext = {"spec": "json", "weights": "safetensors", "onnx": "onnx"}[args.what]
        output = Path(args.output or f"{args.id}-trial{best['trial']}.{ext}")
        if args.what == "spec":
            output.write_text(json.dumps(best["spec"], indent=2))
        else:
            params["trial"] = best["trial"]
            with client.stream("GET", f"{base}/{args.id}/best/{args.what}", params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    _check(response)
                with output.open("wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
        print(output)
    return 0


def _print_tie(best: dict[str, Any]) -> None:
    """The pick and its tie decision in words on stderr, as `spsa-nas best` prints them (stdout stays
    the JSON answer, for scripts)."""
    from workers.cli.common import fmt
    from workers.cli.results import decision_lines

    metrics = best.get("metrics") or {}
    remeasured = metrics.get("latency_remeasured_ms")
    first = fmt(metrics.get("latency_ms"), ".3f")
    latency = (f"{fmt(remeasured, '.3f')} ms re-measured together (first pass {first} ms)"
               if remeasured is not None else f"{first} ms (first pass)")
    lines = [f"best: trial {best.get('trial')}: val acc {fmt(metrics.get('val_acc'))}, {latency}"]
    tie = best.get("tie")
    lines += decision_lines(tie) if isinstance(tie, dict) else [
        "no tie decision in the server's answer (a trial asked for by number is not compared)"]
    print("\n".join(lines), file=sys.stderr)
