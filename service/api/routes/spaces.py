"""/api/v1/spaces: the built-in search spaces a search may name."""

from __future__ import annotations

from fastapi import APIRouter

from search_spaces.loading import builtin_spaces
from service.api.deps import CurrentUser
from service.api.schemas import SpacePublic, SpacesPublic

router = APIRouter(prefix="/spaces", tags=["spaces"])


@router.get("", response_model=SpacesPublic)
def list_spaces(_user: CurrentUser) -> SpacesPublic:
    """The built-in spaces by name, with their full definition."""
    spaces = builtin_spaces()
    data = [SpacePublic(name=name, space=space.model_dump(mode="json")) for name, space in spaces.items()]
    return SpacesPublic(data=data, count=len(data))
