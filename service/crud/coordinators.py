"""Coordinators publish the cluster's resources; the API reads the freshest to check submissions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.core.models import Coordinator, utcnow


def publish_resources(session: Session, *, owner: str, resources: Mapping[str, float]) -> None:
    """Record (or refresh) what the cluster has, as seen by coordinator `owner`. Commits."""
    row = session.get(Coordinator, owner)
    text = json.dumps({str(k): float(v) for k, v in resources.items()}, sort_keys=True)
    if row is None:
        session.add(Coordinator(owner=owner, resources=text, seen_at=utcnow()))
    else:
        row.resources, row.seen_at = text, utcnow()
    session.commit()


def forget_coordinator(session: Session, *, owner: str) -> None:
    """A coordinator that stops takes its report with it. Commits."""
    session.execute(delete(Coordinator).where(Coordinator.owner == owner))
    session.commit()


def cluster_resources(session: Session, *, fresh_s: float) -> dict[str, float] | None:
    """The resources the most recently seen coordinator reported within `fresh_s` seconds; None
    when no coordinator reported lately (then nothing can be checked against them)."""
    row = session.scalar(
        select(Coordinator)
        .where(Coordinator.seen_at >= utcnow() - timedelta(seconds=fresh_s))
        .order_by(Coordinator.seen_at.desc())
        .limit(1)
    )
    return None if row is None else {k: float(v) for k, v in json.loads(row.resources).items()}
