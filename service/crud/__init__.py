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
from service.crud.remeasures import (
    claim_remeasure,
    count_pending_remeasures,
    finish_remeasure,
    release_remeasure,
    remeasure_status,
    renew_remeasure,
    request_remeasure,
)
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
    "claim_remeasure",
    "claimed_status",
    "cluster_resources",
    "count_pending_remeasures",
    "count_searches",
    "create_search",
    "create_user",
    "end_web_session",
    "finish_remeasure",
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
    "release_remeasure",
    "release_search",
    "remeasure_status",
    "renew_lease",
    "renew_remeasure",
    "request_remeasure",
    "revoke_user",
    "session_user",
    "set_priority",
]
