"""OAuth2 client credentials for service principals (the Databricks SDK's oauth-m2m flow).

`POST /oidc/v1/token` with the client id and secret (HTTP Basic, or form fields) answers a signed,
short-lived access token: a JWT (HS256) naming the principal, checked on the hot path by signature
and expiry alone (and the principal still existing), with the result cached per token.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jwt

METADATA_PATH = "/oidc/.well-known/oauth-authorization-server"  # all three answered without a token
TOKEN_PATH = "/oidc/v1/token"
HOST_METADATA_PATH = "/.well-known/databricks-config"  # where the SDK (0.16x) finds the OIDC root
ACCESS_TOKEN_TTL_S = 3600
ISSUER = "berth"
SCOPES = ("all-apis",)
OAUTH_PREFIX = "eyJ"  # a JWT's header, base64url of '{"'


class OAuthError(Exception):
    """An RFC 6749 error answer: `error` code, description and HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status

    def to_dict(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def new_secret() -> str:
    return "bsec_" + secrets.token_urlsafe(32)


def new_application_id() -> str:
    return str(uuid.uuid4())


def metadata(base_url: str) -> dict[str, Any]:
    """RFC 8414 authorization-server metadata (what the SDK reads `token_endpoint` from)."""
    base = base_url.rstrip("/")
    return {
        "issuer": f"{base}/oidc",
        "authorization_endpoint": f"{base}/oidc/v1/authorize",
        "token_endpoint": f"{base}{TOKEN_PATH}",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "response_types_supported": ["token"],
        "scopes_supported": list(SCOPES),
    }


def host_metadata(base_url: str) -> dict[str, Any]:
    """The SDK's host discovery: the OIDC root, under which it finds `METADATA_PATH`."""
    return {"oidc_endpoint": f"{base_url.rstrip('/')}/oidc"}


@dataclass(frozen=True)
class TokenRequest:
    client_id: str
    client_secret: str
    scope: str


def parse_token_request(body: bytes, authorization: str | None) -> TokenRequest:
    """The client-credentials grant from a form-encoded body and an optional Basic header."""
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
    grant = form.get("grant_type", "")
    if grant != "client_credentials":
        raise OAuthError("unsupported_grant_type", f"grant_type must be client_credentials, not '{grant}'.")
    client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                client_id, _, client_secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise OAuthError("invalid_client", "Malformed Basic credentials.", 401) from None
    if not client_id or not client_secret:
        raise OAuthError("invalid_client", "Client authentication failed: send the client id and secret.", 401)
    scope = form.get("scope", "all-apis") or "all-apis"
    unknown = set(scope.split()) - set(SCOPES)
    if unknown:
        raise OAuthError("invalid_scope", f"Unknown scope(s): {', '.join(sorted(unknown))}.")
    return TokenRequest(client_id, client_secret, scope)


def issue(key: bytes, principal_id: str, client_id: str, scope: str, *, now: float | None = None,
          ttl_s: int = ACCESS_TOKEN_TTL_S) -> dict[str, Any]:
    """The token endpoint's answer for an authenticated client."""
    now = time.time() if now is None else now
    claims = {"iss": ISSUER, "sub": principal_id, "client_id": client_id, "scope": scope,
              "iat": int(now), "exp": int(now) + ttl_s, "jti": secrets.token_hex(8)}
    token = jwt.encode(claims, key, algorithm="HS256")
    return {"access_token": token, "token_type": "Bearer", "expires_in": ttl_s, "scope": scope}


def verify(key: bytes, token: str, *, now: float | None = None) -> tuple[str, float] | None:
    """(principal id, expiry) of a valid access token signed with `key`; None for anything else."""
    try:
        claims = jwt.decode(token, key, algorithms=["HS256"], issuer=ISSUER,
                            options={"require": ["exp", "sub", "iss"], "verify_exp": False})
    except jwt.PyJWTError:
        return None
    expiry = float(claims["exp"])
    if expiry <= (time.time() if now is None else now):
        return None
    return str(claims["sub"]), expiry
