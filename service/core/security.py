"""Secrets and request origins: API tokens and dashboard session ids (random, stored as sha256
hashes, compared in constant time), and the same-origin test of state-changing browser requests."""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_PREFIX = "spsa_"


def new_token() -> str:
    """A fresh bearer token (256 bits of randomness); shown to its user once, never stored."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_session_id() -> str:
    """A fresh dashboard session id (256 bits); it lives in the browser's cookie only."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token. A salt adds nothing for 256-bit random tokens."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def same_origin(
    *, origin: str | None, sec_fetch_site: str | None, host: str | None, require: bool
) -> bool:
    """Whether a state-changing request comes from the service's own pages (CSRF defence).

    `Sec-Fetch-Site` (sent by every current browser) must be `same-origin` (or `none`: typed by
    the user). Without it, `Origin` must name this host. With neither header: `require` decides;
    a browser always sends Origin on POST/PUT/DELETE, so only non-browser clients lack both.
    """
    if sec_fetch_site is not None:
        return sec_fetch_site.strip().lower() in ("same-origin", "none")
    if origin is not None:
        origin = origin.strip()
        if not host or origin.lower() == "null" or "://" not in origin:
            return False
        return origin.split("://", 1)[1].rstrip("/").lower() == host.strip().lower()
    return not require
