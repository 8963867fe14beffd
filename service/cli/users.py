"""`spsa-nas users add|token|revoke|list`: the service's users and their tokens."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service.cli.common import load, settings_args
from workers.cli import UsageError


def register(subparsers: Any) -> None:
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
        settings_args(sub)
        sub.set_defaults(run=_users)


def _users(args: argparse.Namespace) -> int:
    from service import crud
    from service.core.db import DatabaseError, make_engine, make_session_factory, migrate, session_scope

    settings = load(args)
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
