"""The control plane's identity, token and permission operations (Databricks shapes).

- SCIM: `/api/2.0/preview/scim/v2/Users` and `/ServicePrincipals` (admins), `/Me` (anyone).
- Service-principal secrets: `POST /api/2.0/accounts/servicePrincipals/{id}/credentials/secrets`
  (admins): the secret is answered once; only its hash is kept.
- Personal access tokens: `/api/2.0/token/create|list|delete` (the caller's own), and
  `POST /api/2.0/token-management/on-behalf-of/tokens` (admins, for another principal).
- OAuth: the token endpoint's client-credentials grant (`berth.access.oauth`).
- Permissions on serving endpoints, by endpoint id.
Every change rebuilds the hot path's `AccessState` through `on_change`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

from berth.access import oauth
from berth.access.permissions import Caller, Level, acl_view, level_of, levels_view, parse_acl
from berth.errors import InvalidParameterValue, PermissionDenied, ResourceDoesNotExist
from berth.gateway.auth import AccessState, hash_token, new_token
from berth.store.access import Principal, TokenRecord
from berth.store.db import Store

SCIM_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
SCIM_SP = "urn:ietf:params:scim:schemas:core:2.0:ServicePrincipal"
SCIM_LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
OAUTH_KEY = "oauth-signing"
KINDS = {"Users": "user", "ServicePrincipals": "service_principal"}


def _ms(t: float | None) -> int:
    return -1 if t is None else int(t * 1000)


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AccessService:
    def __init__(self, store: Store, on_change: Callable[[AccessState], None] = lambda state: None) -> None:
        self.store = store
        self.access = store.access
        self.on_change = on_change
        self.oauth_key = self.access.key(OAUTH_KEY)

    # The hot path's view
    def state(self) -> AccessState:
        principals = {p.id: p.caller for p in self.access.principals()}
        queriers = {name: frozenset(pid for pid, level in acl.items() if level >= Level.CAN_QUERY)
                    for name, acl in self.access.acls().items()}
        return AccessState(self.access.token_hashes(), principals, queriers, self.oauth_key)

    def changed(self) -> None:
        self.on_change(self.state())

    # Checks
    @staticmethod
    def require_admin(caller: Caller) -> None:
        if not caller.admin:
            raise PermissionDenied("Only admins may manage users, service principals and their credentials.")

    def require(self, caller: Caller, endpoint_name: str, needed: Level) -> Level:
        """The caller's level on the endpoint, or 404 (no such endpoint) / 403 (not enough)."""
        endpoint_id = self.access.endpoint_id(endpoint_name)
        if endpoint_id is None:
            raise ResourceDoesNotExist(f"Endpoint '{endpoint_name}' does not exist.")
        return self._check(caller, endpoint_name, endpoint_id, needed)

    def _require_id(self, caller: Caller, endpoint_id: str, needed: Level) -> Level:
        """`require` for the Permissions API, which names endpoints by id."""
        name = self.access.endpoint_name(endpoint_id)
        if name is None:
            raise ResourceDoesNotExist(f"Serving endpoint with id '{endpoint_id}' does not exist.")
        return self._check(caller, name, endpoint_id, needed)

    def _check(self, caller: Caller, name: str, endpoint_id: str, needed: Level) -> Level:
        level = level_of(caller, self.access.acl(endpoint_id))
        if level is None or level < needed:
            raise PermissionDenied(f"{caller.name} does not have {needed.name} on endpoint '{name}'.")
        return level

    def visible(self, caller: Caller) -> Callable[[str], bool]:
        """Which endpoint names the caller may see (for list)."""
        if caller.admin:
            return lambda name: True
        names = {name for name, acl in self.access.acls().items() if caller.id in acl}
        return names.__contains__

    # SCIM
    def scim_create(self, caller: Caller, collection: str, body: Any) -> dict[str, Any]:
        self.require_admin(caller)
        kind = KINDS[collection]
        if not isinstance(body, dict):
            raise InvalidParameterValue("Request body must be a JSON object.")
        if kind == "user":
            name = body.get("userName")
            if not isinstance(name, str) or not name.strip() or len(name) > 256:
                raise InvalidParameterValue("'userName' is required: a non-empty string of at most 256 characters.")
            display = body.get("displayName")
            if display is None or display == "":
                display = name
            elif not isinstance(display, str) or not display.strip() or len(display) > 256:
                raise InvalidParameterValue("'displayName' must be a non-empty string of at most 256 characters.")
            principal = self.access.create_principal("user", name.strip(), display.strip())
        else:
            display = body.get("displayName")
            app_id = body.get("applicationId") or oauth.new_application_id()
            if not isinstance(display, str) or not display.strip() or len(display) > 256:
                raise InvalidParameterValue("'displayName' is required: a non-empty string of at most 256 characters.")
            if not isinstance(app_id, str) or len(app_id) > 64:
                raise InvalidParameterValue("'applicationId' must be a string of at most 64 characters.")
            principal = self.access.create_principal("service_principal", app_id, display.strip())
        self.changed()
        return self._scim(principal)

    def scim_list(self, caller: Caller, collection: str) -> dict[str, Any]:
        self.require_admin(caller)
        items = [self._scim(p) for p in self.access.principals(KINDS[collection])]
        return {"schemas": [SCIM_LIST], "totalResults": len(items), "startIndex": 1, "itemsPerPage": len(items),
                "Resources": items}

    def scim_get(self, caller: Caller, collection: str, principal_id: str) -> dict[str, Any]:
        self.require_admin(caller)
        return self._scim(self.access.principal(principal_id, KINDS[collection]))

    def scim_delete(self, caller: Caller, collection: str, principal_id: str) -> None:
        self.require_admin(caller)
        if principal_id == caller.id:
            raise InvalidParameterValue("You cannot delete yourself.")
        self.access.delete_principal(principal_id, KINDS[collection])
        self.changed()

    def me(self, caller: Caller) -> dict[str, Any]:
        return self._scim(self.access.principal(caller.id))

    @staticmethod
    def _scim(p: Principal) -> dict[str, Any]:
        if p.kind == "user":
            return {"schemas": [SCIM_USER], "id": p.id, "userName": p.name, "displayName": p.display_name,
                    "active": True, "emails": [{"value": p.name, "primary": True}],
                    "roles": [{"value": "admin"}] if p.admin else []}
        return {"schemas": [SCIM_SP], "id": p.id, "applicationId": p.name, "displayName": p.display_name,
                "active": True, "roles": [{"value": "admin"}] if p.admin else []}

    # Service-principal secrets
    def new_secret(self, caller: Caller, principal_id: str) -> dict[str, Any]:
        self.require_admin(caller)
        principal = self.access.principal(principal_id, "service_principal")
        secret = oauth.new_secret()
        self.access.set_secret(principal.id, _hash_secret(secret))
        now = time.time()
        return {"id": principal.id, "secret": secret, "status": "ACTIVE",
                "create_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}

    # OAuth
    def oauth_token(self, body: bytes, authorization: str | None) -> dict[str, Any]:
        request = oauth.parse_token_request(body, authorization)
        known = self.access.secret_hash("service_principal", request.client_id)
        if known is None or known[1] is None or not hmac.compare_digest(known[1], _hash_secret(request.client_secret)):
            raise oauth.OAuthError("invalid_client", "Client authentication failed.", 401)
        return oauth.issue(self.oauth_key, known[0], request.client_id, request.scope)

    # Personal access tokens
    def create_token(self, caller: Caller, body: Any, *, for_principal: Principal | None = None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidParameterValue("Request body must be a JSON object.")
        lifetime = body.get("lifetime_seconds")
        if lifetime is not None and (isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime <= 0):
            raise InvalidParameterValue("'lifetime_seconds' must be a positive integer (omit it for no expiry).")
        comment = body.get("comment") or ""
        if not isinstance(comment, str) or len(comment) > 256:
            raise InvalidParameterValue("'comment' must be a string of at most 256 characters.")
        owner = for_principal.id if for_principal is not None else caller.id
        token = new_token()
        expires = time.time() + lifetime if lifetime is not None else None
        record = self.access.add_token(owner, hash_token(token), comment=comment, expires_at=expires)
        self.changed()
        return {"token_value": token, "token_info": self._token(record)}

    def create_token_for(self, caller: Caller, body: Any) -> dict[str, Any]:
        self.require_admin(caller)
        if not isinstance(body, dict):
            raise InvalidParameterValue("Request body must be a JSON object.")
        if "application_id" in body:
            principal = self.access.find("service_principal", str(body["application_id"]))
        elif "user_name" in body:
            principal = self.access.find("user", str(body["user_name"]))
        else:
            raise InvalidParameterValue("Name the principal: 'application_id' or 'user_name'.")
        if principal is None:
            raise ResourceDoesNotExist("No such principal.")
        return self.create_token(caller, {k: v for k, v in body.items() if k in ("lifetime_seconds", "comment")},
                                 for_principal=principal)

    def list_tokens(self, caller: Caller) -> dict[str, Any]:
        return {"token_infos": [self._token(t) for t in self.access.tokens(caller.id)]}

    def delete_token(self, caller: Caller, body: Any) -> None:
        token_id = body.get("token_id") if isinstance(body, dict) else None
        if not isinstance(token_id, str) or not token_id:
            raise InvalidParameterValue("'token_id' is required.")
        self.access.delete_token(token_id, None if caller.admin else caller.id)
        self.changed()

    @staticmethod
    def _token(t: TokenRecord) -> dict[str, Any]:
        return {"token_id": t.token_id, "creation_time": _ms(t.created_at), "expiry_time": _ms(t.expires_at),
                "comment": t.comment}

    # Permissions (by endpoint id)
    def get_permissions(self, caller: Caller, endpoint_id: str) -> dict[str, Any]:
        self._require_id(caller, endpoint_id, Level.CAN_VIEW)
        return self._acl_view(endpoint_id)

    def set_permissions(self, caller: Caller, endpoint_id: str, body: Any, *, replace: bool) -> dict[str, Any]:
        self._require_id(caller, endpoint_id, Level.CAN_MANAGE)

        def resolve(kind: str, name: str) -> str | None:
            found = self.access.find(kind, name)
            return found.id if found is not None else None

        grants = parse_acl(body, resolve)
        self.access.set_acl(endpoint_id, grants, replace=replace)
        self.changed()
        return self._acl_view(endpoint_id)

    def permission_levels(self, caller: Caller, endpoint_id: str) -> dict[str, Any]:
        self._require_id(caller, endpoint_id, Level.CAN_VIEW)
        return levels_view()

    def _acl_view(self, endpoint_id: str) -> dict[str, Any]:
        everyone = self.access.principals()
        by_id = {p.id: p.caller for p in everyone}
        return acl_view(endpoint_id, self.access.acl(endpoint_id), by_id, [p.caller for p in everyone if p.admin])
