"""The hot-path credential check: who is calling, and may they query this endpoint.

Personal access tokens are known by their SHA-256 hash only; OAuth access tokens are JWTs checked by
signature and expiry. Either way the answer is cached per Authorization header, so a repeat caller
costs one dict lookup and a clock read. `AccessState` is everything the check reads (token hashes
with their owner and expiry, the live principals, who may query each endpoint, the OAuth key); the
control plane rebuilds it on every change and the gateway's processes swap it in whole, which also
empties the cache, so a revoked token or a removed grant stops working at once.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.access import oauth
from berth.access.permissions import Caller
from berth.errors import Unauthenticated

TOKEN_PREFIX = "berth_"
CACHE_LIMIT = 4096


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class AccessState:
    """What the hot path needs to authenticate and authorise a call."""

    tokens: Mapping[str, tuple[str, float | None]] = field(default_factory=dict)  # hash → (principal id, expiry)
    principals: Mapping[str, Caller] = field(default_factory=dict)  # id → caller
    queriers: Mapping[str, frozenset[str]] = field(default_factory=dict)  # endpoint → ids with CAN_QUERY or more
    oauth_key: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": [[h, pid, exp] for h, (pid, exp) in self.tokens.items()],
            "principals": [[c.id, c.name, c.kind, c.admin] for c in self.principals.values()],
            "queriers": {name: sorted(ids) for name, ids in self.queriers.items()},
            "oauth_key": self.oauth_key.hex(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AccessState:
        return cls(
            tokens={h: (pid, exp) for h, pid, exp in data["tokens"]},
            principals={pid: Caller(pid, name, kind, admin) for pid, name, kind, admin in data["principals"]},
            queriers={name: frozenset(ids) for name, ids in data["queriers"].items()},
            oauth_key=bytes.fromhex(data["oauth_key"]),
        )


class TokenAuthority:
    """Authenticates Authorization headers against an `AccessState`, with a per-header cache."""

    def __init__(self, state: AccessState | None = None) -> None:
        self.state = state or AccessState()
        self._cache: dict[bytes, tuple[Caller, float]] = {}

    def replace(self, state: AccessState) -> None:
        self.state = state
        self._cache = {}

    def authenticate(self, authorization: bytes | None) -> Caller:
        """The caller behind `Bearer <token>`, or `Unauthenticated`."""
        if authorization is None:
            raise Unauthenticated("Missing credentials: send 'Authorization: Bearer <token>'.")
        hit = self._cache.get(authorization)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        caller, expiry = self._resolve(authorization)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache = {}
        self._cache[authorization] = (caller, expiry)
        return caller

    def may_query(self, caller: Caller, endpoint: str) -> bool:
        return caller.admin or caller.id in self.state.queriers.get(endpoint, ())

    def _resolve(self, authorization: bytes) -> tuple[Caller, float]:
        scheme, _, raw = authorization.partition(b" ")
        token = raw.strip()
        if scheme.lower() != b"bearer" or not token:
            raise Unauthenticated("Invalid authorization header: expected 'Bearer <token>'.")
        state = self.state
        now = time.time()
        if token.startswith(oauth.OAUTH_PREFIX.encode()):
            verified = oauth.verify(state.oauth_key, token.decode("ascii", "replace"), now=now) \
                if state.oauth_key else None
            if verified is None:
                raise Unauthenticated("Invalid or expired OAuth access token.")
            principal_id, expiry = verified
        else:
            known = state.tokens.get(hashlib.sha256(token).hexdigest())
            if known is None:
                raise Unauthenticated("Invalid access token.")
            principal_id, expires = known
            if expires is not None and expires <= now:
                raise Unauthenticated("The access token has expired.")
            expiry = expires if expires is not None else math.inf
        caller = state.principals.get(principal_id)
        if caller is None:
            raise Unauthenticated("The token's principal no longer exists.")
        return caller, expiry
