"""Property tests of the request parsers: any JSON-like input parses, or is refused with a 4xx
`BerthError` (the token endpoint's parser: a 4xx `OAuthError`, RFC 6749's shape), never another exception.

Inputs are drawn near the valid shape (the parsers' own field names, with valid and invalid values
mixed with arbitrary JSON) so the checks deep in each parser are reached, not only the first type check.
Integers stay in the 64-bit range JSON bodies arrive with (orjson refuses larger ones).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from berth.access import oauth
from berth.access.permissions import Level, parse_acl, parse_level
from berth.control.service import _parse_tags
from berth.control.spec import EndpointConfig, parse_config, validate_endpoint_name
from berth.errors import BerthError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
names = st.from_regex(r"\A[A-Za-z0-9_-]{1,63}\Z") | st.text(max_size=70)
digit_strings = (st.sampled_from(["4", "0", "-1", "1.5", "", "²", "١٢", "9" * 5000])
                 | st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6))
counts = st.integers(min_value=-2, max_value=2000) | digit_strings


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each as often as its weight (`st.one_of` merges repeated branches)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


def body_or_json(strategy: st.SearchStrategy[Any], odds: int = 3) -> st.SearchStrategy[Any]:
    """Mostly (`odds` to one) the near-valid shape, else arbitrary JSON in its place."""
    return weighted((odds, strategy), (1, json_values))


def fields(optional: dict[str, st.SearchStrategy[Any]],
           required: dict[str, st.SearchStrategy[Any]] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the required fields and any subset of the optional ones (each near-valid or arbitrary
    JSON), and maybe another key."""
    known = st.fixed_dictionaries({key: body_or_json(value, 8) for key, value in (required or {}).items()},
                                  optional={key: body_or_json(value) for key, value in optional.items()})
    extra = st.dictionaries(st.text(max_size=8), json_values, max_size=1)
    return st.builds(lambda a, b: {**b, **a}, known, extra)


def few(strategy: st.SearchStrategy[Any], most: int = 17) -> st.SearchStrategy[list[Any]]:
    """Lists of one to three items, sometimes of none or many."""
    return st.lists(strategy, min_size=1, max_size=3) | st.lists(strategy, max_size=most)


entity_fields = {
    "name": names,
    "entity_version": st.text(max_size=5) | st.integers(min_value=0, max_value=2**63),
    "workload_size": st.sampled_from(["Small", "medium", "LARGE", "Huge", ""]),
    "workload_type": st.sampled_from(["CPU", "CPU_MEDIUM", "CPU_LARGE", "GPU_SMALL", "TPU", ""]),
    "scale_to_zero_enabled": st.booleans(),
    "min_provisioned_concurrency": counts,
    "max_provisioned_concurrency": counts,
    "environment_vars": st.dictionaries(st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,8}\Z") | st.text(max_size=5),
                                        st.text(max_size=5) | json_values, max_size=4),
}
locations = weighted((3, st.sampled_from(["/models/m", "file:///tmp/m", "./m", "models:/m/1"])),
                     (1, st.sampled_from(["plain", " ", ""]) | st.text()))
entity = weighted((5, fields(entity_fields, {"entity_name": locations})),
                  (1, fields({"external_model": json_values, **entity_fields})))
served_model = fields({"model_version": st.text(max_size=5), **entity_fields}, {"model_name": locations})
route = fields({"served_model_name": names, "served_entity_name": names},
               {"traffic_percentage": st.integers(min_value=-5, max_value=105)})
traffic = {"traffic_config": fields({"routes": few(body_or_json(route, 8), 4)})}
configs = body_or_json(weighted(
    (4, fields(traffic, {"served_entities": few(body_or_json(entity, 8))})),
    (1, fields(traffic, {"served_models": few(body_or_json(served_model, 8), 3)})),
    (1, fields({"served_entities": few(entity), "served_models": few(served_model, 3), **traffic})),
), 8)
tag = fields({"value": st.text(max_size=10)}, {"key": st.text(max_size=10)})
tag_lists = body_or_json(few(body_or_json(tag), 5))
levels = st.sampled_from([level.name for level in Level]) | st.sampled_from(["CAN_RUN", "can_view", "1", "Level"])
acl_entry = fields({"user_name": st.text(max_size=10), "service_principal_name": st.text(max_size=10),
                    "group_name": st.text(max_size=5)}, {"permission_level": levels})
acl_bodies = body_or_json(fields({"access_control_list": few(body_or_json(acl_entry), 4)}))


def attempt(parse: Callable[..., Any], *args: Any) -> Any:
    """What `parse` returns, or the `BerthError` or `OAuthError` it raised (any other exception propagates)."""
    try:
        return parse(*args)
    except (BerthError, oauth.OAuthError) as exc:
        return exc


def refused_with_4xx(outcome: Any) -> bool:
    """True when `outcome` is a client-error refusal (asserting its shape); False when it parsed."""
    if isinstance(outcome, oauth.OAuthError):
        assert 400 <= outcome.status < 500, (outcome.error, outcome.status)
        assert outcome.error in ("unsupported_grant_type", "invalid_client", "invalid_scope")
        return True
    if isinstance(outcome, BerthError):
        assert 400 <= outcome.http_status < 500, (type(outcome), outcome.http_status, outcome.message)
        assert outcome.error_code
        assert outcome.message
        return True
    return False


def resolve(kind: str, name: str) -> str | None:
    """Principals whose names start with a letter exist (ids echo kind and name)."""
    return f"{kind}:{name}" if name[:1].isalpha() else None


@FUZZ
@given(configs)
def test_parse_config_parses_or_refuses_with_4xx(raw: Any) -> None:
    config = attempt(parse_config, raw)
    if refused_with_4xx(config):
        return
    assert isinstance(config, EndpointConfig)
    assert sum(r.traffic_percentage for r in config.routes) == 100
    assert parse_config(config.to_input_dict()) == config  # what the store keeps parses back the same


@FUZZ
@given(json_values | names)
def test_validate_endpoint_name_parses_or_refuses_with_4xx(raw: Any) -> None:
    name = attempt(validate_endpoint_name, raw)
    assert refused_with_4xx(name) or name == raw


@FUZZ
@given(acl_bodies)
def test_parse_acl_parses_or_refuses_with_4xx(body: Any) -> None:
    grants = attempt(parse_acl, body, resolve)
    assert refused_with_4xx(grants) or all(isinstance(level, Level) for level in grants.values())


@FUZZ
@given(json_values | levels)
def test_parse_level_parses_or_refuses_with_4xx(value: Any) -> None:
    level = attempt(parse_level, value)
    assert refused_with_4xx(level) or isinstance(level, Level)


@FUZZ
@given(tag_lists)
def test_parse_tags_parses_or_refuses_with_4xx(raw: Any) -> None:
    tags = attempt(_parse_tags, raw)
    if refused_with_4xx(tags):
        return
    assert all(isinstance(t["key"], str) for t in tags)
    assert all(isinstance(t.get("value", ""), str) for t in tags)


form_values = st.text(max_size=12) | st.sampled_from(["client_credentials", "all-apis", "all-apis other", ""])
forms = st.dictionaries(st.sampled_from(["grant_type", "client_id", "client_secret", "scope"]) | st.text(max_size=5),
                        form_values, max_size=5).map(lambda form: urlencode(form).encode())
credentials = st.builds(lambda user, secret: base64.b64encode(f"{user}:{secret}".encode()).decode(),
                        st.text(max_size=8), st.text(max_size=8))
authorizations = st.none() | st.text(max_size=30) | st.builds(
    lambda scheme, value: f"{scheme} {value}", st.sampled_from(["Basic", "basic", "Bearer"]),
    credentials | st.text(max_size=20) | st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode()))


@FUZZ
@given(forms | st.binary(max_size=64), authorizations)
def test_parse_token_request_parses_or_refuses_with_4xx(body: bytes, authorization: str | None) -> None:
    request = attempt(oauth.parse_token_request, body, authorization)
    if refused_with_4xx(request):
        return
    assert request.client_id
    assert request.client_secret
    assert set(request.scope.split()) <= set(oauth.SCOPES)


@pytest.mark.parametrize(("value", "read"), [("²", None), ("9" * 5000, None), ("١٢", 12), ("12", 12)])
def test_unusual_digit_strings_in_provisioned_concurrency_are_refused_or_read(value: str, read: int | None) -> None:
    """Regression (found writing these tests): `str.isdigit` is true of '²', whose `int()` raised ValueError (a
    500 at the API); and of 5,000 digits, past `int()`'s limit. Decimal digits of any script still read."""
    raw = {"served_entities": [{"entity_name": "/models/m", "max_provisioned_concurrency": value}]}
    config = attempt(parse_config, raw)
    if read is None:
        assert refused_with_4xx(config)
    else:
        assert config.served_entities[0].max_provisioned_concurrency == read
