"""Optional bearer-token check: on when OVIS_API_KEY holds one or more keys."""

import hashlib
import hmac

import structlog
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from ovis_service.errors import UnauthorizedError

logger = structlog.get_logger(__name__)

PUBLIC = "public"  # route option: reachable without a key (health checks)


class ApiKeyGuard:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(key.encode() for key in keys)

    def __call__(self, connection: ASGIConnection, handler: BaseRouteHandler) -> None:  # type: ignore[type-arg]
        if not self._keys or handler.opt.get(PUBLIC):
            return
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            logger.warning("auth_failed", reason="missing bearer token", path=connection.url.path)
            raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
        presented = token.strip().encode()
        # Compare against every key without stopping early, so timing says nothing about which
        # key, or how much of one, matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            logger.warning("auth_failed", reason="invalid API key", path=connection.url.path)
            raise UnauthorizedError("invalid API key")


def key_owner(connection: ASGIConnection, keys: tuple[str, ...]) -> str:  # type: ignore[type-arg]
    """Who owns the jobs a request makes: a digest of its API key (the guard has checked it),
    never the key itself, so a leaked database names no key. Without keys every caller is one
    owner, ""."""
    if not keys:
        return ""
    token = connection.headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(token.encode()).hexdigest()
