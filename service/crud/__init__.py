"""Create/read/update of the service's rows: keyword-only functions over a Session, one module per
table family (users and tokens, dashboard sessions, searches, the dispatcher's claims)."""

from service.crud.claims import (
    cancel_search_row,
    claim_next_search,
    claimed_status,
    finish_search,
    release_search,
    renew_lease,
)
from service.crud.coordinators import cluster_resources, forget_coordinator, publish_resources
from service.crud.searches import (
    count_searches,
    create_search,
    get_search,
    list_searches,
    owned_study_names,
    set_priority,
)
from service.crud.sessions import end_web_session, open_web_session, session_user
from service.crud.users import (
    USER_NAME_RE,
    UserError,
    authenticate,
    create_user,
    get_user_by_name,
    issue_token,
    list_users,
    revoke_user,
)

__all__ = [
    "USER_NAME_RE",
    "UserError",
    "authenticate",
    "cancel_search_row",
    "claim_next_search",
    "claimed_status",
    "cluster_resources",
    "count_searches",
    "create_search",
    "create_user",
    "end_web_session",
    "finish_search",
    "forget_coordinator",
    "get_search",
    "get_user_by_name",
    "issue_token",
    "list_searches",
    "list_users",
    "open_web_session",
    "owned_study_names",
    "publish_resources",
    "release_search",
    "renew_lease",
    "revoke_user",
    "session_user",
    "set_priority",
]
