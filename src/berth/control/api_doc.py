"""The OpenAPI 3.1 document of the whole platform API (`GET /api/2.0/openapi`).

`platform_openapi` is a pure function of the route table: each registered (path, method) pair is
described from `OPERATIONS`, and a route with no entry there is left out (the test that compares the
document with `build_control_app`'s routes then fails). The gateway's own paths (`GATEWAY_ROUTES`)
are always in. Request schemas say what the handlers accept (`berth.control.spec.parse_config`,
`berth.control.access`, `berth.access`); cross-field rules JSON Schema cannot say are in descriptions.
Errors are Databricks' `{"error_code", "message"}`; the per-endpoint query schema stays in
`berth.control.openapi` (`GET /api/2.0/serving-endpoints/{name}/openapi`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from berth import __version__
from berth.access import oauth
from berth.access.permissions import DESCRIPTIONS, Level
from berth.control.secrets import MAX_VALUE_BYTES
from berth.control.spec import (
    CPU_WORKLOAD_TYPES,
    MAX_ENVIRONMENT_VARS,
    MAX_PROVISIONED_CONCURRENCY,
    MAX_SERVED_ENTITIES,
    WORKLOAD_SIZES,
)
from berth.ratelimit.rules import KEYS, MAX_CALLS, WINDOW_S
from berth.store.db import DECISIONS_KEPT

OPENAPI_VERSION = "3.1.0"
DOC_PATH = "/api/2.0/openapi"
BASE = "/api/2.0/serving-endpoints"
SCIM = "/api/2.0/preview/scim/v2"
PERMISSIONS = "/api/2.0/permissions/serving-endpoints/{endpoint_id}"
SECRETS = "/api/2.0/secrets"
INVOCATIONS = "/serving-endpoints/{name}/invocations"
# Answered by the gateway itself (berth.gateway.app), not by the control plane's Starlette app.
GATEWAY_ROUTES: tuple[tuple[str, str], ...] = (
    (INVOCATIONS, "POST"),
    ("/ping", "GET"),
    ("/health", "GET"),
    ("/metrics", "GET"),
    ("/dashboard", "GET"),
)
OPEN = ()  # `security: []`: answered without a token

_JSON = "application/json"
_NAME_PATTERN = "^[A-Za-z0-9_-]{1,63}$"
_ENV_NAME_PATTERN = "^[A-Za-z_][A-Za-z0-9_]*$"
_NON_BLANK = r"\S"
_SECRET_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,128}$"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _case_insensitive(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" for c in word)


def _obj(properties: dict[str, Any], required: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    out.update(extra)
    return out


_STRING = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_LEVEL = {"type": "string", "enum": [level.name for level in Level]}
_RATE_LIMITS = {"type": "array", "items": _ref("AiGatewayRateLimit")}

_ENTITY_FIELDS: dict[str, Any] = {
    "workload_size": {
        "type": "string",
        "pattern": "^(" + "|".join(_case_insensitive(s) for s in WORKLOAD_SIZES) + ")$",
        "description": f"One of {', '.join(WORKLOAD_SIZES)} (any case); the default is Small. Not with "
                       "min/max_provisioned_concurrency.",
    },
    "workload_type": {"type": "string", "enum": sorted(CPU_WORKLOAD_TYPES), "default": "CPU",
                      "description": "GPU workload types are refused: this server has no GPU backend."},
    "scale_to_zero_enabled": {**_BOOL, "default": False},
    "min_provisioned_concurrency": {"type": "integer", "minimum": 0, "maximum": MAX_PROVISIONED_CONCURRENCY},
    "max_provisioned_concurrency": {"type": "integer", "minimum": 1, "maximum": MAX_PROVISIONED_CONCURRENCY,
                                    "description": "At least min_provisioned_concurrency."},
    "environment_vars": {
        "type": "object",
        "maxProperties": MAX_ENVIRONMENT_VARS,
        "propertyNames": {"pattern": _ENV_NAME_PATTERN},
        "additionalProperties": _STRING,
        "description": "A value may be a whole secret reference, {{secrets/<scope>/<key>}}: the secret must exist and "
                       "the caller manage its scope; a replica sees its value, views keep the reference.",
    },
}
_MODEL_LOCATION = {
    "type": "string",
    "minLength": 1,
    "description": "A registered model name (with entity_version), a models:/name/version, models:/name@alias, "
                   "runs:/run_id/path or artifact URI resolved through the MLflow tracking server, or a local "
                   "MLflow model directory or file:// URI.",
}
_ENDPOINT_STATE = _obj(
    {"ready": {"type": "string", "enum": ["READY", "NOT_READY"]},
     "config_update": {"type": "string", "enum": ["NOT_UPDATING", "IN_PROGRESS", "UPDATE_FAILED", "UPDATE_CANCELED"]}},
    ["ready", "config_update"],
)
_ENDPOINT_FIELDS: dict[str, Any] = {
    "name": _STRING,
    "id": _STRING,
    "creator": _STRING,
    "creation_timestamp": _INT,
    "last_updated_timestamp": _INT,
    "state": _ENDPOINT_STATE,
    "permission_level": _LEVEL,
    "route_optimized": _BOOL,
    "tags": {"type": "array", "items": _ref("EndpointTag")},
    "description": _STRING,
    "ai_gateway": _ref("AiGatewayConfig"),
}
_ENDPOINT_REQUIRED = ["name", "id", "creator", "creation_timestamp", "last_updated_timestamp", "state", "tags"]
_SCIM_ROLES = {"type": "array", "items": _obj({"value": _STRING}, ["value"])}
_TOKEN_INFO = _obj({"token_id": _STRING, "creation_time": _INT, "comment": _STRING,
                    "expiry_time": {**_INT, "description": "-1: never expires."}},
                   ["token_id", "creation_time", "expiry_time", "comment"])

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error_code": _STRING, "message": _STRING, "stack_trace": _STRING}, ["error_code", "message"]),
    "OAuthError": _obj({"error": _STRING, "error_description": _STRING}, ["error", "error_description"]),
    "EndpointTag": _obj({"key": _STRING, "value": _STRING}, ["key"]),
    "ServedEntityInput": _obj(
        {"name": {"type": "string", "pattern": _NAME_PATTERN,
                  "description": "Unique in the config; by default derived from entity_name and entity_version."},
         "entity_name": _MODEL_LOCATION,
         "entity_version": {"type": ["string", "integer"]},
         **_ENTITY_FIELDS},
        ["entity_name"],
    ),
    "ServedModelInput": _obj(
        {"name": {"type": "string", "pattern": _NAME_PATTERN}, "model_name": _MODEL_LOCATION,
         "model_version": {"type": ["string", "integer"]}, **_ENTITY_FIELDS},
        ["model_name"],
        description="Legacy form of ServedEntityInput (model_name, model_version).",
    ),
    "TrafficConfig": _obj(
        {"routes": {"type": "array", "items": _obj(
            {"served_model_name": _STRING, "served_entity_name": _STRING,
             "traffic_percentage": {"type": "integer", "minimum": 0, "maximum": 100}},
            ["traffic_percentage"])}},
        description="Each route names a served entity once; percentages sum to 100. Optional with one entity.",
    ),
    "EndpointCoreConfigInput": _obj(
        {"served_entities": {"type": "array", "minItems": 1, "maxItems": MAX_SERVED_ENTITIES,
                             "items": _ref("ServedEntityInput")},
         "served_models": {"type": "array", "minItems": 1, "maxItems": MAX_SERVED_ENTITIES,
                           "items": _ref("ServedModelInput")},
         "traffic_config": _ref("TrafficConfig"),
         "auto_capture_config": _ref("InferenceTableConfig")},
        oneOf=[{"required": ["served_entities"]}, {"required": ["served_models"]}],
        description="served_entities or (legacy) served_models, not both; entity names unique.",
    ),
    "CreateServingEndpoint": _obj(
        {"name": {"type": "string", "pattern": _NAME_PATTERN},
         "config": _ref("EndpointCoreConfigInput"),
         "tags": {"type": "array", "items": _ref("EndpointTag")},
         "description": _STRING,
         "route_optimized": {"type": "boolean", "enum": [False],
                             "description": "Not supported: every endpoint is served through the gateway."},
         "ai_gateway": _ref("AiGatewayConfig"),
         "rate_limits": {**_RATE_LIMITS, "deprecated": True, "description": "Not with ai_gateway.rate_limits."}},
        ["name", "config"],
    ),
    "PatchServingEndpointTags": _obj(
        {"add_tags": {"type": "array", "items": _ref("EndpointTag")},
         "delete_tags": {"type": "array", "items": _STRING}},
    ),
    "EndpointTags": _obj({"tags": {"type": "array", "items": _ref("EndpointTag")}}, ["tags"]),
    "ServedEntityOutput": _obj(
        {"name": _STRING, "entity_name": _STRING, "entity_version": _STRING, **_ENTITY_FIELDS,
         "creator": _STRING, "creation_timestamp": _INT,
         "state": _obj({"deployment": _STRING, "deployment_state_message": _STRING}, ["deployment"])},
        ["name", "entity_name", "workload_type", "scale_to_zero_enabled", "min_provisioned_concurrency",
         "max_provisioned_concurrency", "state"],
    ),
    "TrafficConfigOutput": _obj({"routes": {"type": "array", "items": _obj(
        {"served_model_name": _STRING, "served_entity_name": _STRING, "traffic_percentage": _INT},
        ["served_model_name", "traffic_percentage"])}}, ["routes"]),
    "EndpointConfigOutput": _obj(
        {"config_version": _INT, "start_time": _INT,
         "served_entities": {"type": "array", "items": _ref("ServedEntityOutput")},
         "traffic_config": _ref("TrafficConfigOutput")},
        ["config_version", "served_entities", "traffic_config"],
    ),
    "ServingEndpointDetailed": _obj(
        {**_ENDPOINT_FIELDS, "config": _ref("EndpointConfigOutput"), "pending_config": _ref("EndpointConfigOutput")},
        _ENDPOINT_REQUIRED,
    ),
    "ServingEndpoint": _obj(
        {**_ENDPOINT_FIELDS, "config": _obj(
            {"config_version": _INT, "served_entities": {"type": "array", "items": _obj(
                {"name": _STRING, "entity_name": _STRING, "entity_version": _STRING}, ["name", "entity_name"])}},
            ["served_entities"])},
        _ENDPOINT_REQUIRED,
    ),
    "ListEndpoints": _obj({"endpoints": {"type": "array", "items": _ref("ServingEndpoint")}}, ["endpoints"]),
    "ServedModelLogs": _obj({"logs": _STRING}, ["logs"]),
    "AutoscalerDecisions": _obj(
        {"decisions": {"type": "array", "items": _obj({"served_entity_name": _STRING, "timestamp": {}},
                                                      ["served_entity_name"])}},
        ["decisions"],
    ),
    "AiGatewayRateLimit": _obj(
        {"calls": {"type": "integer", "minimum": 1, "maximum": MAX_CALLS,
                   "description": "Calls allowed per renewal period."},
         "key": {"type": "string", "enum": list(KEYS), "default": "endpoint",
                 "description": "endpoint: one budget for all callers; user, service_principal: one per caller "
                                "of that kind (or only the one named by principal)."},
         "renewal_period": {"type": "string", "enum": list(WINDOW_S), "default": "minute"},
         "principal": {"type": "string", "minLength": 1,
                       "description": "A user name or application id; not with key endpoint."}},
        ["calls"],
        additionalProperties=False,
        description="At most one limit per (key, principal).",
    ),
    "InferenceTableConfig": _obj(
        {"catalog_name": _STRING, "schema_name": _STRING, "table_name_prefix": _STRING,
         "enabled": {"type": "boolean"}},
        description="Log every request and response of the endpoint to a Delta table (DATA_DIR/inference/<endpoint> "
                    "or under BERTH_INFERENCE_TABLES_URI), with the AI-gateway payload table's columns; "
                    "catalog_name and schema_name are required when enabled.",
    ),
    "AiGatewayConfig": _obj(
        {"rate_limits": _RATE_LIMITS,
         "inference_table_config": _ref("InferenceTableConfig"),
         **{block: _obj({"enabled": {"type": "boolean", "enum": [False]}},
                        description="Not supported yet: accepted only when disabled.")
            for block in ("usage_tracking_config", "guardrails", "fallback_config")}},
        additionalProperties=False,
        description="Databricks' AiGatewayConfig; Berth enforces its rate_limits and writes its inference table.",
    ),
    "RateLimits": _obj({"rate_limits": _RATE_LIMITS}, additionalProperties=False),
    "RateLimitsOutput": _obj({"rate_limits": _RATE_LIMITS}, ["rate_limits"]),
    "ScimUserInput": _obj(
        {"userName": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": _NON_BLANK},
         "displayName": _STRING},
        ["userName"],
    ),
    "ScimServicePrincipalInput": _obj(
        {"displayName": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": _NON_BLANK},
         "applicationId": {"type": "string", "maxLength": 64, "description": "Generated (a UUID) when absent."}},
        ["displayName"],
    ),
    "ScimUser": _obj(
        {"schemas": {"type": "array", "items": _STRING}, "id": _STRING, "userName": _STRING,
         "displayName": _STRING, "active": _BOOL, "roles": _SCIM_ROLES,
         "emails": {"type": "array", "items": _obj({"value": _STRING, "primary": _BOOL})}},
        ["schemas", "id", "userName", "displayName", "active"],
    ),
    "ScimServicePrincipal": _obj(
        {"schemas": {"type": "array", "items": _STRING}, "id": _STRING, "applicationId": _STRING,
         "displayName": _STRING, "active": _BOOL, "roles": _SCIM_ROLES},
        ["schemas", "id", "applicationId", "displayName", "active"],
    ),
    "ScimUserList": _obj(
        {"schemas": {"type": "array", "items": _STRING}, "totalResults": _INT, "startIndex": _INT,
         "itemsPerPage": _INT, "Resources": {"type": "array", "items": _ref("ScimUser")}},
        ["totalResults", "Resources"],
    ),
    "ScimServicePrincipalList": _obj(
        {"schemas": {"type": "array", "items": _STRING}, "totalResults": _INT, "startIndex": _INT,
         "itemsPerPage": _INT, "Resources": {"type": "array", "items": _ref("ScimServicePrincipal")}},
        ["totalResults", "Resources"],
    ),
    "SecretInfo": _obj({"id": _STRING, "secret": _STRING, "status": _STRING, "create_time": _STRING},
                       ["id", "secret", "status", "create_time"],
                       description="The secret is answered once; only its hash is kept."),
    "CreateTokenRequest": _obj(
        {"lifetime_seconds": {"type": "integer", "minimum": 1, "description": "Omit it for no expiry."},
         "comment": {"type": "string", "maxLength": 256}},
    ),
    "CreateOboTokenRequest": _obj(
        {"application_id": _STRING, "user_name": _STRING,
         "lifetime_seconds": {"type": "integer", "minimum": 1}, "comment": {"type": "string", "maxLength": 256}},
        anyOf=[{"required": ["application_id"]}, {"required": ["user_name"]}],
        description="For a service principal (application_id) or, failing that, a user (user_name).",
    ),
    "TokenInfo": _TOKEN_INFO,
    "CreateTokenResponse": _obj({"token_value": _STRING, "token_info": _ref("TokenInfo")},
                                ["token_value", "token_info"]),
    "ListTokensResponse": _obj({"token_infos": {"type": "array", "items": _ref("TokenInfo")}}, ["token_infos"]),
    "RevokeTokenRequest": _obj({"token_id": {"type": "string", "minLength": 1}}, ["token_id"]),
    "Empty": {"type": "object", "maxProperties": 0},
    "OAuthMetadata": _obj(
        {"issuer": _STRING, "authorization_endpoint": _STRING, "token_endpoint": _STRING,
         "grant_types_supported": {"type": "array", "items": _STRING},
         "token_endpoint_auth_methods_supported": {"type": "array", "items": _STRING},
         "response_types_supported": {"type": "array", "items": _STRING},
         "scopes_supported": {"type": "array", "items": _STRING}},
        ["issuer", "token_endpoint"],
    ),
    "HostMetadata": _obj({"oidc_endpoint": _STRING}, ["oidc_endpoint"]),
    "TokenRequest": _obj(
        {"grant_type": {"type": "string", "enum": ["client_credentials"]},
         "client_id": {**_STRING, "description": "Or the user part of HTTP Basic credentials."},
         "client_secret": {**_STRING, "description": "Or the password part of HTTP Basic credentials."},
         "scope": {"type": "string", "enum": list(oauth.SCOPES)}},
        ["grant_type"],
    ),
    "TokenResponse": _obj({"access_token": _STRING, "token_type": _STRING, "expires_in": _INT, "scope": _STRING},
                          ["access_token", "token_type", "expires_in"]),
    "AccessControlRequest": _obj(
        {"user_name": _STRING, "service_principal_name": _STRING, "permission_level": _LEVEL},
        ["permission_level"],
        oneOf=[{"required": ["user_name"]}, {"required": ["service_principal_name"]}],
        **{"not": {"required": ["group_name"]}},
        description="Exactly one existing principal: user_name or service_principal_name (groups unsupported).",
    ),
    "PermissionsRequest": _obj(
        {"access_control_list": {"type": "array", "items": _ref("AccessControlRequest")}},
    ),
    "Permissions": _obj(
        {"object_id": _STRING, "object_type": _STRING, "access_control_list": {"type": "array", "items": _obj(
            {"user_name": _STRING, "service_principal_name": _STRING, "display_name": _STRING,
             "all_permissions": {"type": "array", "items": _obj(
                 {"permission_level": _LEVEL, "inherited": _BOOL,
                  "inherited_from_object": {"type": "array", "items": _STRING}},
                 ["permission_level", "inherited"])}},
            ["all_permissions"])}},
        ["object_id", "object_type", "access_control_list"],
    ),
    "PermissionLevels": _obj(
        {"permission_levels": {"type": "array", "items": _obj(
            {"permission_level": _LEVEL, "description": _STRING}, ["permission_level"])}},
        ["permission_levels"],
        description="; ".join(f"{level.name}: {text}" for level, text in DESCRIPTIONS.items()),
    ),
    "CreateScopeRequest": _obj(
        {"scope": _SECRET_NAME,
         "scope_backend_type": {"type": "string", "enum": ["DATABRICKS"], "default": "DATABRICKS"},
         "initial_manage_principal": {"type": "string", "maxLength": 0,
                                      "description": "Not supported: the creator and admins manage a scope."}},
        ["scope"],
    ),
    "ScopeRequest": _obj({"scope": _SECRET_NAME}, ["scope"]),
    "ListScopesResponse": _obj(
        {"scopes": {"type": "array", "items": _obj({"name": _STRING, "backend_type": {"type": "string",
                                                                                        "enum": ["DATABRICKS"]}},
                                                   ["name", "backend_type"])}},
        description="Every scope (names are not secret); no `scopes` when there are none.",
    ),
    "PutSecretRequest": _obj(
        {"scope": _SECRET_NAME, "key": _SECRET_NAME,
         "string_value": {"type": "string", "description": "Stored as UTF-8."},
         "bytes_value": {"type": "string", "contentEncoding": "base64", "description": "Stored as these bytes."}},
        ["scope", "key"],
        oneOf=[{"required": ["string_value"]}, {"required": ["bytes_value"]}],
        description=f"Exactly one of string_value or bytes_value, at most {MAX_VALUE_BYTES // 1024} KiB; "
                    "overwrites the key's value. As an environment variable a value must be UTF-8 text.",
    ),
    "SecretRequest": _obj({"scope": _SECRET_NAME, "key": _SECRET_NAME}, ["scope", "key"]),
    "ListSecretsResponse": _obj(
        {"secrets": {"type": "array", "items": _obj({"key": _STRING, "last_updated_timestamp": _INT},
                                                    ["key", "last_updated_timestamp"])}},
        description="The scope's keys (never their values), milliseconds since the epoch; no `secrets` when "
                    "there are none.",
    ),
    "QueryInput": _obj(
        {"dataframe_split": {"type": "object"}, "dataframe_records": {"type": "array"},
         "instances": {"type": "array"}, "inputs": {}, "params": {"type": "object"}},
        description="MLflow's scoring input; the endpoint's own document "
                    "(GET /api/2.0/serving-endpoints/{name}/openapi) has its model's exact schema.",
    ),
}

_ERROR_TEXT = {
    400: "Invalid request (INVALID_PARAMETER_VALUE, BAD_REQUEST, MALFORMED_REQUEST).",
    401: "No valid token (UNAUTHENTICATED).",
    403: "Not allowed for this caller (PERMISSION_DENIED).",
    404: "No such resource (RESOURCE_DOES_NOT_EXIST).",
    409: "Conflict (RESOURCE_ALREADY_EXISTS, RESOURCE_CONFLICT).",
    413: "The body is over the size limit, BERTH_MAX_BODY_MB (PAYLOAD_TOO_LARGE).",
    415: "The served model does not take this content type.",
    429: "Over the endpoint's rate limit (REQUEST_LIMIT_EXCEEDED), or its concurrency and queue are full "
         "(RESOURCE_EXHAUSTED); retry after Retry-After.",
    503: "No replica could answer in time (TEMPORARILY_UNAVAILABLE); retry after Retry-After.",
    504: "The model did not answer within the request timeout (DEADLINE_EXCEEDED).",
}

PARAMETERS: dict[str, dict[str, Any]] = {
    "name": {"name": "name", "in": "path", "required": True, "description": "The serving endpoint's name.",
             "schema": {"type": "string", "pattern": _NAME_PATTERN}},
    "served": {"name": "served", "in": "path", "required": True, "description": "A served entity's name.",
               "schema": {"type": "string", "pattern": _NAME_PATTERN}},
    "endpoint_id": {"name": "endpoint_id", "in": "path", "required": True,
                    "description": "The serving endpoint's id (its `id` field).", "schema": _STRING},
    "id": {"name": "id", "in": "path", "required": True, "description": "A principal's id.", "schema": _STRING},
    "served_entity_name": {"name": "served_entity_name", "in": "query", "required": False,
                           "description": "Only this served entity's decisions.", "schema": _STRING},
    "limit": {"name": "limit", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "maximum": DECISIONS_KEPT, "default": 100}},
    "scope": {"name": "scope", "in": "query", "required": True, "description": "A secret scope's name.",
              "schema": _SECRET_NAME},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _op(
    summary: str,
    tag: str,
    ok: tuple[int, str | None, str],
    *,
    body: str | None = None,
    errors: Iterable[int] = (),
    query: Iterable[str] = (),
    security: tuple[()] | None = None,
    body_media: str = _JSON,
    ok_media: str = _JSON,
    error_schema: str = "Error",
    description: str | None = None,
) -> dict[str, Any]:
    """One operation: `ok` is (status, response schema name or None, description)."""
    status, schema, text = ok
    response: dict[str, Any] = {"description": text}
    if schema is not None:
        response["content"] = {ok_media: {"schema": _ref(schema) if schema in SCHEMAS else {"type": schema}}}
    responses: dict[str, Any] = {str(status): response}
    codes = set(errors) | ({400, 413} if body is not None else set()) | ({401} if security is None else set())
    for code in sorted(codes):
        shape = "Error" if code == 413 else error_schema  # the gateway's size check answers before any handler
        responses[str(code)] = _json(_ref(shape), _ERROR_TEXT[code])
    out: dict[str, Any] = {"summary": summary, "tags": [tag], "operationId": "", "responses": responses}
    if description:
        out["description"] = description
    if query:
        out["parameters"] = [PARAMETERS[q] for q in query]
    if body is not None:
        out["requestBody"] = {"required": True, "content": {body_media: {"schema": _ref(body)}}}
    if security is not None:
        out["security"] = list(security)
    return out


_ENDPOINTS = "serving-endpoints"
_IDENTITIES = "identities"
_TOKENS = "tokens"
_OAUTH = "oauth"
_PERMS = "permissions"
_GATEWAY = "gateway"
_VIEW, _MANAGE = "Needs CAN_VIEW on the endpoint.", "Needs CAN_MANAGE on the endpoint."
_ADMIN = "Admins only."
_SECRETS = "secrets"
_SCOPE_MANAGER = "Needs MANAGE on the scope: its creator's, and every admin's."

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    (DOC_PATH, "GET"): _op("This document: the platform's whole API", "platform",
                           (200, "object", "An OpenAPI 3.1 document.")),
    (BASE, "POST"): _op("Create a serving endpoint", _ENDPOINTS,
                        (200, "ServingEndpointDetailed", "The endpoint, config_update IN_PROGRESS."),
                        body="CreateServingEndpoint", errors=(409,),
                        description="The caller gets CAN_MANAGE on it."),
    (BASE, "GET"): _op("List the serving endpoints the caller may see", _ENDPOINTS,
                       (200, "ListEndpoints", "The endpoints.")),
    (BASE + "/{name}", "GET"): _op("Get a serving endpoint", _ENDPOINTS,
                                   (200, "ServingEndpointDetailed", "The endpoint."), errors=(403, 404),
                                   description=_VIEW),
    (BASE + "/{name}", "DELETE"): _op("Delete a serving endpoint", _ENDPOINTS, (200, "Empty", "Deleted."),
                                      errors=(403, 404), description=_MANAGE),
    (BASE + "/{name}/config", "PUT"): _op(
        "Update a serving endpoint's config", _ENDPOINTS, (200, "ServingEndpointDetailed", "The endpoint."),
        body="EndpointCoreConfigInput", errors=(403, 404, 409),
        description=_MANAGE + " 409 while an update is IN_PROGRESS."),
    (BASE + "/{name}/tags", "PATCH"): _op("Add and delete tags", _ENDPOINTS, (200, "EndpointTags", "All tags."),
                                          body="PatchServingEndpointTags", errors=(403, 404),
                                          description=_MANAGE),
    (BASE + "/{name}/served-models/{served}/logs", "GET"): _op(
        "A served entity's replica output", _ENDPOINTS, (200, "ServedModelLogs", "The newest replica's output."),
        errors=(403, 404), description=_MANAGE),
    (BASE + "/{name}/served-models/{served}/build-logs", "GET"): _op(
        "A served entity's model-load output", _ENDPOINTS, (200, "ServedModelLogs", "Its model-load part."),
        errors=(403, 404), description=_MANAGE),
    (BASE + "/{name}/openapi", "GET"): _op(
        "The endpoint's query API (OpenAPI 3.1)", _ENDPOINTS,
        (200, "object", "An OpenAPI document: JSON text; application/json when asked for, else text/plain."),
        errors=(403, 404), ok_media="text/plain", description=_VIEW),
    (BASE + "/{name}/metrics", "GET"): _op(
        "The endpoint's metrics (Prometheus text)", _ENDPOINTS, (200, "string", "Prometheus text format 0.0.4."),
        errors=(403, 404), ok_media="text/plain", description=_VIEW),
    (BASE + "/{name}/autoscaler/decisions", "GET"): _op(
        "The autoscaler's newest decisions, oldest first", _ENDPOINTS, (200, "AutoscalerDecisions", "Decisions."),
        errors=(400, 403, 404), query=("served_entity_name", "limit"), description=_VIEW),
    (BASE + "/{name}/series", "GET"): _op(
        "The dashboard's per-second series of the endpoint", _ENDPOINTS,
        (200, "object", "t, qps, errors_per_s, p50_ms, p99_ms; per served entity its replicas and concurrency; "
                        "the autoscaler's newest decisions."),
        errors=(403, 404), description=_VIEW),
    (BASE + "/{name}/ai-gateway", "PUT"): _op(
        "Set the endpoint's AI gateway config (rate limits, inference table)", _ENDPOINTS,
        (200, "AiGatewayConfig", "The config."),
        body="AiGatewayConfig", errors=(403, 404), description=_MANAGE),
    (BASE + "/{name}/rate-limits", "PUT"): _op(
        "Set the endpoint's rate limits (deprecated: use ai-gateway)", _ENDPOINTS,
        (200, "RateLimitsOutput", "The rate limits."), body="RateLimits", errors=(403, 404), description=_MANAGE),
    (SCIM + "/Me", "GET"): _op("The calling principal", _IDENTITIES, (200, "object", "A SCIM user or service "
                                                                                     "principal.")),
    (SCIM + "/Users", "POST"): _op("Create a user", _IDENTITIES, (201, "ScimUser", "The user."),
                                   body="ScimUserInput", errors=(403, 409), description=_ADMIN),
    (SCIM + "/Users", "GET"): _op("List users", _IDENTITIES, (200, "ScimUserList", "The users."), errors=(403,),
                                  description=_ADMIN),
    (SCIM + "/Users/{id}", "GET"): _op("Get a user", _IDENTITIES, (200, "ScimUser", "The user."),
                                       errors=(403, 404), description=_ADMIN),
    (SCIM + "/Users/{id}", "DELETE"): _op("Delete a user (and their tokens and grants)", _IDENTITIES,
                                          (204, None, "Deleted."), errors=(400, 403, 404), description=_ADMIN),
    (SCIM + "/ServicePrincipals", "POST"): _op(
        "Create a service principal", _IDENTITIES, (201, "ScimServicePrincipal", "The service principal."),
        body="ScimServicePrincipalInput", errors=(403, 409), description=_ADMIN),
    (SCIM + "/ServicePrincipals", "GET"): _op(
        "List service principals", _IDENTITIES, (200, "ScimServicePrincipalList", "The service principals."),
        errors=(403,), description=_ADMIN),
    (SCIM + "/ServicePrincipals/{id}", "GET"): _op(
        "Get a service principal", _IDENTITIES, (200, "ScimServicePrincipal", "The service principal."),
        errors=(403, 404), description=_ADMIN),
    (SCIM + "/ServicePrincipals/{id}", "DELETE"): _op(
        "Delete a service principal (and its tokens and grants)", _IDENTITIES, (204, None, "Deleted."),
        errors=(400, 403, 404), description=_ADMIN),
    ("/api/2.0/accounts/servicePrincipals/{id}/credentials/secrets", "POST"): _op(
        "Create an OAuth secret for a service principal", _IDENTITIES, (200, "SecretInfo", "The new secret."),
        errors=(403, 404), description=_ADMIN + " Replaces its previous secret."),
    ("/api/2.0/token/create", "POST"): _op("Create a personal access token", _TOKENS,
                                           (200, "CreateTokenResponse", "The token, answered once."),
                                           body="CreateTokenRequest"),
    ("/api/2.0/token/list", "GET"): _op("List the caller's tokens", _TOKENS, (200, "ListTokensResponse", "Tokens.")),
    ("/api/2.0/token/delete", "POST"): _op("Revoke a token", _TOKENS, (200, "Empty", "Revoked."),
                                           body="RevokeTokenRequest", errors=(404,),
                                           description="The caller's own; admins may revoke any."),
    ("/api/2.0/token-management/on-behalf-of/tokens", "POST"): _op(
        "Create a token for another principal", _TOKENS, (200, "CreateTokenResponse", "The token, answered once."),
        body="CreateOboTokenRequest", errors=(403, 404), description=_ADMIN),
    (oauth.HOST_METADATA_PATH, "GET"): _op("Host metadata (where the SDK finds the OIDC root)", _OAUTH,
                                           (200, "HostMetadata", "The OIDC root."), security=OPEN),
    (oauth.METADATA_PATH, "GET"): _op("OAuth authorization-server metadata (RFC 8414)", _OAUTH,
                                      (200, "OAuthMetadata", "The metadata."), security=OPEN),
    (oauth.TOKEN_PATH, "POST"): _op(
        "OAuth token endpoint (client credentials)", _OAUTH, (200, "TokenResponse", "A short-lived access token."),
        body="TokenRequest", body_media="application/x-www-form-urlencoded", errors=(401,), security=OPEN,
        error_schema="OAuthError",
        description="The client id and secret as form fields or HTTP Basic credentials (client_secret_basic). "
                    "Errors are RFC 6749's: 400 unsupported_grant_type or invalid_scope, 401 invalid_client."),
    (PERMISSIONS, "GET"): _op("Get an endpoint's permissions", _PERMS, (200, "Permissions", "Its ACL."),
                              errors=(403, 404), description=_VIEW),
    (PERMISSIONS, "PUT"): _op("Replace an endpoint's permissions", _PERMS, (200, "Permissions", "Its ACL."),
                              body="PermissionsRequest", errors=(403, 404), description=_MANAGE),
    (PERMISSIONS, "PATCH"): _op("Add to an endpoint's permissions", _PERMS, (200, "Permissions", "Its ACL."),
                                body="PermissionsRequest", errors=(403, 404), description=_MANAGE),
    (PERMISSIONS + "/permissionLevels", "GET"): _op(
        "The permission levels of serving endpoints", _PERMS, (200, "PermissionLevels", "The levels."),
        errors=(403, 404), description=_VIEW),
    (INVOCATIONS, "POST"): _op(
        "Query a serving endpoint", _GATEWAY, (200, "object", "The model's predictions (MLflow's format)."),
        body="QueryInput", errors=(403, 404, 415, 429, 503, 504),
        description="Needs CAN_QUERY. Answered by a replica of a served entity chosen by the traffic split "
                    "(the served-model-name header names it); a request waits for a replica of an entity at "
                    "zero or starting. Also takes text/csv and application/x-parquet bodies."),
    (SECRETS + "/scopes/create", "POST"): _op(
        "Create a secret scope", _SECRETS, (200, "Empty", "Created."), body="CreateScopeRequest", errors=(409,),
        description="The caller manages it (and every admin)."),
    (SECRETS + "/scopes/delete", "POST"): _op("Delete a secret scope and its secrets", _SECRETS,
                                              (200, "Empty", "Deleted."), body="ScopeRequest", errors=(403, 404),
                                              description=_SCOPE_MANAGER),
    (SECRETS + "/scopes/list", "GET"): _op("List the secret scopes", _SECRETS,
                                           (200, "ListScopesResponse", "The scopes.")),
    (SECRETS + "/put", "POST"): _op(
        "Put a secret", _SECRETS, (200, "Empty", "Stored (encrypted)."), body="PutSecretRequest", errors=(403, 404),
        description=_SCOPE_MANAGER + " A served entity's environment_vars name it as {{secrets/<scope>/<key>}}; "
                                     "no API answers its value."),
    (SECRETS + "/list", "GET"): _op("List a scope's secret keys", _SECRETS, (200, "ListSecretsResponse", "The keys."),
                                    errors=(400, 403, 404), query=("scope",), description=_SCOPE_MANAGER),
    (SECRETS + "/delete", "POST"): _op("Delete a secret", _SECRETS, (200, "Empty", "Deleted."),
                                       body="SecretRequest", errors=(403, 404), description=_SCOPE_MANAGER),
    ("/ping", "GET"): _op("Liveness", _GATEWAY, (200, None, "The gateway answers."), security=OPEN),
    ("/health", "GET"): _op("Liveness", _GATEWAY, (200, None, "The gateway answers."), security=OPEN),
    ("/metrics", "GET"): _op("The platform's metrics (Prometheus text)", _GATEWAY,
                             (200, "string", "Prometheus text format."), errors=(403,), ok_media="text/plain",
                             description=_ADMIN),
    ("/dashboard", "GET"): _op("The dashboard (an HTML page; it asks for a token and keeps it in the browser "
                               "session)", _GATEWAY, (200, "string", "The page."), ok_media="text/html",
                               security=OPEN),
}

_PATH_PARAM = re.compile(r"\{(\w+)\}")
_CONVERTED = re.compile(r"\{(\w+):(\w+)\}")


def _operation_id(method: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path.replace("{", "by-").replace("2.0", ""))
    return method.lower() + "".join(w[:1].upper() + w[1:] for w in words if w not in ("api",))


def route_pairs(routes: Iterable[Any]) -> list[tuple[str, str]]:
    """(OpenAPI path, method) of each Starlette route, HEAD left out. A parameter whose convertor
    matches a fixed set of names (SCIM's `Users|ServicePrincipals`) becomes one path per name."""
    pairs: list[tuple[str, str]] = []
    for route in routes:
        methods = getattr(route, "methods", None)
        if not methods:
            continue
        paths = [route.path]
        while any(_CONVERTED.search(p) for p in paths):
            expanded = []
            for path in paths:
                match = _CONVERTED.search(path)
                if match is None:
                    expanded.append(path)
                    continue
                regex = route.param_convertors[match.group(1)].regex
                names = regex.split("|") if re.fullmatch(r"\w+(\|\w+)*", regex) else [f"{{{match.group(1)}}}"]
                expanded.extend(path[: match.start()] + name + path[match.end():] for name in names)
            paths = expanded
        pairs.extend((path, method) for path in paths for method in sorted(methods) if method != "HEAD")
    return pairs


def platform_openapi(routes: Iterable[tuple[str, str]], server_url: str | None = None) -> dict[str, Any]:
    """The document for these control-plane (path, method) pairs plus the gateway's own paths."""
    paths: dict[str, dict[str, Any]] = {}
    for path, method in [*routes, *GATEWAY_ROUTES]:
        operation = OPERATIONS.get((path, method))
        if operation is None:
            continue  # undocumented: left out
        item = paths.setdefault(path, {})
        params = [PARAMETERS[name] for name in _PATH_PARAM.findall(path)]
        if params and "parameters" not in item:
            item["parameters"] = params
        item[method.lower()] = {**operation, "operationId": _operation_id(method, path)}
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Berth platform API", "version": __version__,
                 "description": "Databricks-compatible serving endpoints, identities, tokens and permissions. "
                                "Errors are {\"error_code\", \"message\"}; any request may also be refused "
                                "with 431 when its headers are over the size limit."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "A personal access token or an OAuth "
                                                                     "access token."}}},
        "security": [{"bearer": []}],
    }
    if server_url:
        doc["servers"] = [{"url": server_url.rstrip("/")}]
    return doc
