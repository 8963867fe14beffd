"""optuna-dashboard behind the service's login: the gateway (ASGI), its route allow-list, and the
storage each caller's dashboard runs over."""

from service.dashboard.gateway import CALLER_KEY, Caller, DashboardGateway
from service.dashboard.routes import ROUTES, match_route, normalise_path
from service.dashboard.storage import ReadOnlyStudyError, ScopedStorage

__all__ = [
    "CALLER_KEY",
    "ROUTES",
    "Caller",
    "DashboardGateway",
    "ReadOnlyStudyError",
    "ScopedStorage",
    "match_route",
    "normalise_path",
]
