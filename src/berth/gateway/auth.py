"""Bearer tokens: only SHA-256 hashes are stored and held in memory; checking is one hash lookup."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from berth.errors import Unauthenticated

TOKEN_PREFIX = "berth_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenAuthority:
    """The set of valid token hashes, refreshed from the store when tokens change."""

    def __init__(self, hashes: Iterable[str] = ()) -> None:
        self._hashes = frozenset(hashes)

    def replace(self, hashes: Iterable[str]) -> None:
        self._hashes = frozenset(hashes)

    def check(self, authorization: bytes | None) -> None:
        """Raise `Unauthenticated` unless the header is `Bearer <valid token>`."""
        if not authorization:
            raise Unauthenticated("Missing credentials: send 'Authorization: Bearer <token>'.")
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise Unauthenticated("Invalid authorization header: expected 'Bearer <token>'.")
        if hashlib.sha256(token.strip()).hexdigest() not in self._hashes:
            raise Unauthenticated("Invalid access token.")
