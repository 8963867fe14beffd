"""`spsa-nas serve`, `spsa-nas users ...` and `spsa-nas remote ...` (a client of a running server)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from service.cli import UsageError

DEFAULT_URL = "http://127.0.0.1:8000"
# After SIGTERM, open requests have this long to finish before uvicorn cancels them; then the app's
# lifespan stops the dispatcher (Dispatcher.stop). docker-compose.yml's stop_grace_period covers
# both (tests/service/test_compose.py checks it).
GRACEFUL_SHUTDOWN_S = 30


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="start the service: API, dispatcher, Ray, optuna-dashboard")
    _settings_args(serve)
    serve.add_argument("--host", help="address to listen on (SPSA_NAS_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (SPSA_NAS_PORT; default 8000)")
    serve.add_argument("--concurrent-searches", type=int, help="searches run at once (0: dispatcher off)")
    serve.set_defaults(run=_serve)

    users = subparsers.add_parser("users", help="manage the service's users and their tokens")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="create a user and print its token (shown once)")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may see and manage every user's searches")
    token = users_sub.add_parser("token", help="issue a new token for an existing (or revoked) user")
    token.add_argument("name")
    revoke = users_sub.add_parser("revoke", help="disable a user and revoke all its tokens")
    revoke.add_argument("name")
    listing = users_sub.add_parser("list", help="list users")
    for sub in (add, token, revoke, listing):
        _settings_args(sub)
        sub.set_defaults(run=_users)

    remote = subparsers.add_parser("remote", help="talk to a running spsa-nas server over HTTP")
    remote_sub = remote.add_subparsers(dest="remote_command", required=True)
    submit = remote_sub.add_parser("submit", help="submit a search from a JSON or YAML file ('-': stdin)")
    submit.add_argument("file")
    status = remote_sub.add_parser("status", help="a search's status and progress (no id: list searches)")
    status.add_argument("id", nargs="?")
    cancel = remote_sub.add_parser("cancel", help="cancel a search")
    cancel.add_argument("id")
    best = remote_sub.add_parser("best", help="the best architecture of a search (spec and metrics)")
    best.add_argument("id")
    download = remote_sub.add_parser("download", help="download the best spec, weights or ONNX file")
    download.add_argument("id")
    download.add_argument("what", choices=("spec", "weights", "onnx"))
    download.add_argument("-o", "--output", help="file to write (default: <id>-trial<N>.<ext> here)")
    for sub in (best, download):
        sub.add_argument("--latency-budget-ms", type=float, help="the best trial under this latency")
        sub.add_argument("--trial", type=int, help="this trial number instead of the best")
    for sub in (submit, status, cancel, best, download):
        sub.add_argument(
            "--url",
            default=os.environ.get("SPSA_NAS_URL", DEFAULT_URL),
            help="the server (SPSA_NAS_URL; default %(default)s)",
        )
        sub.add_argument("--token", default=None, help="API token (default: $SPSA_NAS_TOKEN)")
        sub.set_defaults(run=_remote)


def _settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="data directory (SPSA_NAS_DATA_DIR; default ./spsa-nas-data)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (SPSA_NAS_DATABASE_URL)")
    parser.add_argument("--settings", help="a YAML settings file (SPSA_NAS_SETTINGS_FILE)")


def _load(args: argparse.Namespace, **extra: Any) -> Any:
    from service.settings import SettingsError, load_settings

    try:
        return load_settings(args.settings, data_dir=args.data_dir, database_url=args.database_url, **extra)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


# --- serve ---------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from service.app import create_app
    from service.db import DatabaseError

    settings = _load(args, host=args.host, port=args.port, concurrent_searches=args.concurrent_searches)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except DatabaseError as exc:
        raise UsageError(str(exc)) from None
    url = f"http://{settings.host}:{settings.port}"
    print(
        f"spsa-nas serving on {url}  (API docs {url}/docs, dashboard {url}/login)\n"
        f"  database {settings.db_url.split('@')[-1]}\n  artifacts {settings.artifact_path}\n"
        f"  data root {settings.data_root_path}\n  Ray {settings.ray_address or 'in-process'}",
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        access_log=settings.access_log,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    return 0


# --- users ---------------------------------------------------------------------------------------


def _users(args: argparse.Namespace) -> int:
    from service import crud
    from service.db import DatabaseError, make_engine, make_session_factory, migrate, session_scope

    settings = _load(args)
    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
        with session_scope(make_session_factory(engine)) as session:
            command = args.users_command
            if command == "add":
                user, token = crud.create_user(session, name=args.name, is_admin=args.admin)
                print(
                    f"created {'admin ' if user.is_admin else ''}user {user.name}; "
                    "its token (shown only once):",
                    file=sys.stderr,
                )
                print(token)
            elif command == "token":
                user = crud.get_user_by_name(session, name=args.name)
                if user is None:
                    raise crud.UserError(f"no user named {args.name!r}; `spsa-nas users add {args.name}`")
                print(crud.issue_token(session, user=user))
            elif command == "revoke":
                n = crud.revoke_user(session, name=args.name)
                print(f"revoked user {args.name} ({n} token{'s' * (n != 1)})", file=sys.stderr)
            else:
                for user, n in crud.list_users(session):
                    state = "active" if user.is_active else "revoked"
                    print(f"{user.name}\t{'admin' if user.is_admin else 'user'}\t{state}\t{n} live tokens")
    except (crud.UserError, DatabaseError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        engine.dispose()
    return 0


# --- remote --------------------------------------------------------------------------------------


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
    else:
        params = {
            k: v
            for k, v in (("latency_budget_ms", args.latency_budget_ms), ("trial", args.trial))
            if v is not None
        }
        best = _check(client.get(f"{base}/{args.id}/best", params=params)).json()
        if command == "best":
            print(json.dumps(best, indent=2))
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
