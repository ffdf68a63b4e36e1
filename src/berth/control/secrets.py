"""The Databricks Secrets API, and `{{secrets/<scope>/<key>}}` in a served entity's environment_vars.

- `POST /api/2.0/secrets/scopes/create` `{scope}`, `POST /api/2.0/secrets/scopes/delete` `{scope}`,
  `GET /api/2.0/secrets/scopes/list`;
- `POST /api/2.0/secrets/put` `{scope, key, string_value | bytes_value}`, `GET /api/2.0/secrets/list?scope=`,
  `POST /api/2.0/secrets/delete` `{scope, key}`.
No route answers a value. A scope's creator manages it (admins manage every scope): only they may put, list
or delete its secrets, and only they may name its secrets in an endpoint's config, since a model that
echoes its environment would hand the value to whoever deployed it. References are checked when a config
is accepted (the scope and key exist, the caller manages the scope); values are decrypted only in
`resolve`, when a replica's environment is built, and are never stored, logged or shown resolved.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from typing import Any

from cryptography.fernet import InvalidToken

from berth.access.permissions import Caller
from berth.control.spec import EndpointConfig, SecretReference, secret_reference, secret_references
from berth.errors import (
    InvalidParameterValue,
    MalformedRequest,
    PermissionDenied,
    ResourceDoesNotExist,
)
from berth.replica.launch import THREAD_VARS
from berth.store.secrets import ScopeRecord, SecretStore

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}\Z")
MAX_VALUE_BYTES = 128 * 1024
MAX_ENV_STRING = 128 * 1024  # Linux's MAX_ARG_STRLEN: one "NAME=value\0" that execve takes
BACKEND_TYPE = "DATABRICKS"


class SecretUnavailable(Exception):
    """A replica's environment names a secret that cannot be read now (its message names the reference,
    never a value)."""


def parse_name(body: Any, field: str) -> str:
    """A scope or key name from a request body (or query): 1 to 128 characters from [A-Za-z0-9_.-]."""
    value = body.get(field) if isinstance(body, dict) else None
    if value is None or value == "":
        raise InvalidParameterValue(f"'{field}' is required.")
    if not isinstance(value, str) or not NAME_RE.match(value):
        label = "Scope" if field == "scope" else "Key"
        raise InvalidParameterValue(f"{label} name {value!r} is invalid: it must consist of alphanumeric characters, "
                                    "dashes, underscores and periods, and may not exceed 128 characters.")
    return value


def parse_value(body: dict[str, Any]) -> bytes:
    """Exactly one of `string_value` (stored as UTF-8) or `bytes_value` (base64), at most 128 KiB."""
    given = [f for f in ("string_value", "bytes_value") if body.get(f) is not None]
    if len(given) != 1:
        if given:
            raise MalformedRequest("Give exactly one of 'string_value' or 'bytes_value', not both.")
        raise InvalidParameterValue("Give exactly one of 'string_value' or 'bytes_value'.")
    raw = body[given[0]]
    if not isinstance(raw, str):
        raise InvalidParameterValue(f"'{given[0]}' must be a string.")
    if given[0] == "string_value":
        value = raw.encode()
    else:
        try:
            value = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameterValue("'bytes_value' must be base64-encoded.") from None
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidParameterValue(f"The secret value is {len(value)} bytes; the limit is {MAX_VALUE_BYTES} "
                                    "(128 KiB).")
    return value


def can_manage(caller: Caller, scope: ScopeRecord) -> bool:
    return caller.admin or (scope.owner is not None and scope.owner == caller.id)


def _body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidParameterValue("Request body must be a JSON object.")
    return body


class SecretService:
    def __init__(self, store: SecretStore) -> None:
        self.store = store

    def _managed(self, caller: Caller, name: str) -> ScopeRecord:
        """The scope, or 404 (none; scope names are not secret) / 403 (the caller does not manage it)."""
        scope = self.store.scope(name)
        if scope is None:
            raise ResourceDoesNotExist(f"Scope {name} does not exist!")
        if not can_manage(caller, scope):
            raise PermissionDenied(f"{caller.name} does not have MANAGE permission on scope {name}.")
        return scope

    # Scopes
    def create_scope(self, caller: Caller, body: Any) -> dict[str, Any]:
        body = _body(body)
        name = parse_name(body, "scope")
        if body.get("initial_manage_principal") not in (None, ""):
            raise InvalidParameterValue("initial_manage_principal is not supported: a scope is managed by its "
                                        "creator and by admins.")
        backend = body.get("scope_backend_type")
        if backend not in (None, BACKEND_TYPE) or body.get("backend_azure_keyvault") is not None:
            raise InvalidParameterValue(f"Only {BACKEND_TYPE}-backed scopes are supported (Berth's own store).")
        self.store.create_scope(name, caller.id)
        return {}

    def delete_scope(self, caller: Caller, body: Any) -> dict[str, Any]:
        name = parse_name(_body(body), "scope")
        self._managed(caller, name)
        self.store.delete_scope(name)
        return {}

    def list_scopes(self, caller: Caller) -> dict[str, Any]:
        """Every scope (names are not secret, as on Databricks); an empty list is omitted, as there."""
        scopes = [{"name": s.name, "backend_type": BACKEND_TYPE} for s in self.store.scopes()]
        return {"scopes": scopes} if scopes else {}

    # Secrets
    def put(self, caller: Caller, body: Any) -> dict[str, Any]:
        body = _body(body)
        scope, key = parse_name(body, "scope"), parse_name(body, "key")
        value = parse_value(body)
        self._managed(caller, scope)
        self.store.put(scope, key, value)
        return {}

    def list_secrets(self, caller: Caller, query: Any) -> dict[str, Any]:
        scope = parse_name(query, "scope")
        self._managed(caller, scope)
        listed = [{"key": key, "last_updated_timestamp": int(at * 1000)} for key, at in self.store.keys(scope)]
        return {"secrets": listed} if listed else {}

    def delete(self, caller: Caller, body: Any) -> dict[str, Any]:
        body = _body(body)
        scope, key = parse_name(body, "scope"), parse_name(body, "key")
        self._managed(caller, scope)
        self.store.delete(scope, key)
        return {}

    # Endpoint configs
    def require_references(self, caller: Caller | None, config: EndpointConfig) -> None:
        """Each secret a config names exists and the caller manages its scope (None: the platform itself,
        which may name any); else 400/403/404 before anything is written."""
        for i, entity in enumerate(config.served_entities):
            where = f"served_entities[{i}].environment_vars"
            for ref in secret_references(entity.environment_vars, where):
                if ref.variable in THREAD_VARS:
                    raise InvalidParameterValue(f"{where}[{ref.variable!r}] sizes a native thread pool and cannot "
                                                "hold a secret.")
                scope = self.store.scope(ref.scope)
                if scope is None:
                    raise ResourceDoesNotExist(f"{where}[{ref.variable!r}] references {ref}, but scope {ref.scope} "
                                               "does not exist.")
                if caller is not None and not can_manage(caller, scope):
                    raise PermissionDenied(f"{where}[{ref.variable!r}] references {ref}: {caller.name} does not "
                                           f"have MANAGE permission on scope {ref.scope}.")
                if not self.store.exists(ref.scope, ref.key):
                    raise ResourceDoesNotExist(f"{where}[{ref.variable!r}] references {ref}, but scope {ref.scope} "
                                               f"has no secret {ref.key}.")

    def resolve(self, env: dict[str, str]) -> dict[str, str]:
        """The environment with each reference replaced by its secret's value (literal values as given);
        `SecretUnavailable` naming the reference when one cannot be read."""
        out = dict(env)
        for ref in _references(env):
            out[ref.variable] = self._value(ref)
        return out

    def _value(self, ref: SecretReference) -> str:
        name = f"environment_vars[{ref.variable!r}]: {ref}"
        try:
            raw = self.store.value(ref.scope, ref.key)
        except InvalidToken:
            raise SecretUnavailable(f"{name} cannot be decrypted with this server's secrets key "
                                    "(BERTH_SECRETS_KEY, or DATA_DIR/secrets.key).") from None
        except Exception as exc:  # the store is down: a failed start (retried), never a failed reconcile pass
            raise SecretUnavailable(f"{name} could not be read from the store ({type(exc).__name__}).") from None
        if raw is None:
            raise SecretUnavailable(f"{name} does not exist (was it deleted?). Put it back, or update the "
                                    "endpoint's config.")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretUnavailable(f"{name} holds bytes that are not UTF-8 text, which an environment "
                                    "variable cannot carry.") from None
        if "\x00" in text:
            raise SecretUnavailable(f"{name} holds a NUL character, which an environment variable cannot carry.")
        if len(ref.variable) + len(raw) + 2 > MAX_ENV_STRING:
            raise SecretUnavailable(f"{name} is {len(raw)} bytes: with its name, over the {MAX_ENV_STRING} bytes an "
                                    "environment variable may hold.")
        return text


def _references(env: dict[str, str]) -> Iterable[SecretReference]:
    for variable, value in env.items():
        ref = secret_reference(variable, value)
        if ref is not None:
            yield ref
