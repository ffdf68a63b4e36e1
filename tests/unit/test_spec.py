"""Parsing and validating endpoint configs, default names, and replica planning (pure functions)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.control.spec import (
    EndpointConfig,
    ReplicaPlan,
    Route,
    default_entity_name,
    is_model_uri,
    parse_config,
    plan_replicas,
    sanitize_name,
    validate_endpoint_name,
)
from berth.errors import InvalidParameterValue

MODEL = "/models/churn"


def one(**entity: Any) -> dict[str, Any]:
    return {"served_entities": [{"entity_name": MODEL, **entity}]}


def invalid(raw: Any) -> str:
    with pytest.raises(InvalidParameterValue) as info:
        parse_config(raw)
    assert info.value.http_status == 400
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    return info.value.message


class TestEndpointName:
    @pytest.mark.parametrize("name", ["a", "my-endpoint_2", "A" * 63, "0", "-_-"])
    def test_valid(self, name: str) -> None:
        assert validate_endpoint_name(name) == name

    @pytest.mark.parametrize(
        "name",
        [
            "",
            "has space",
            "dot.ted",
            "A" * 64,
            "slash/name",
            "ünïcode",
            "trailing\n",
            "\nleading",
            None,
            7,
            ["a"],
        ],
    )
    def test_invalid(self, name: Any) -> None:
        with pytest.raises(InvalidParameterValue):
            validate_endpoint_name(name)


class TestDefaultNames:
    @pytest.mark.parametrize(
        ("entity_name", "version", "expected"),
        [
            ("/models/churn", None, "churn"),
            ("/models/churn/", None, "churn"),
            ("/models/churn.v2", None, "churn-v2"),
            ("file:///srv/models/fraud model", None, "fraud-model"),
            ("./relative/clf", "3", "clf-3"),
            ("/models/churn", "12", "churn-12"),
            ("runs:/0a1b2c/model", None, "model"),
        ],
    )
    def test_default_entity_name(self, entity_name: str, version: str | None, expected: str) -> None:
        assert default_entity_name(entity_name, version) == expected

    def test_parse_uses_the_default_name_and_a_single_100_percent_route(self) -> None:
        cfg = parse_config({"served_entities": [{"entity_name": "/m/churn.v2", "entity_version": 4}]})
        (e,) = cfg.served_entities
        assert e.name == "churn-v2-4"
        assert e.entity_version == "4"
        assert cfg.routes == (Route("churn-v2-4", 100),)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("...", "model"),
            ("a b c", "a-b-c"),
            ("--x--", "x"),
            ("x" * 100, "x" * 63),
            ("ok_NAME-1", "ok_NAME-1"),
        ],
    )
    def test_sanitize_name(self, text: str, expected: str) -> None:
        assert sanitize_name(text) == expected

    @given(st.text(max_size=200))
    def test_sanitized_names_are_always_valid(self, text: str) -> None:
        assert validate_endpoint_name(sanitize_name(text))

    @pytest.mark.parametrize(
        ("entity_name", "uri"),
        [
            ("/abs/path", True),
            ("./rel", True),
            ("file:///x", True),
            ("runs:/a/b", True),
            ("churn", False),
            ("main.default.churn", False),
        ],
    )
    def test_is_model_uri(self, entity_name: str, uri: bool) -> None:
        assert is_model_uri(entity_name) is uri


class TestConcurrency:
    @pytest.mark.parametrize(
        ("size", "stz", "lo", "hi"),
        [
            ("Small", False, 4, 4),
            ("Medium", False, 8, 16),
            ("Large", False, 16, 64),
            ("Small", True, 0, 4),
            ("Medium", True, 0, 16),
            ("Large", True, 0, 64),
            ("large", False, 16, 64),
        ],
    )
    def test_workload_sizes(self, size: str, stz: bool, lo: int, hi: int) -> None:
        (e,) = parse_config(one(workload_size=size, scale_to_zero_enabled=stz)).served_entities
        assert e.workload_size == size.capitalize()
        assert (e.min_provisioned_concurrency, e.max_provisioned_concurrency) == (lo, hi)
        assert e.scale_to_zero_enabled is stz

    def test_default_is_small_on_cpu(self) -> None:
        (e,) = parse_config(one()).served_entities
        assert (e.workload_size, e.workload_type) == ("Small", "CPU")
        assert (e.min_provisioned_concurrency, e.max_provisioned_concurrency) == (4, 4)
        assert e.scale_to_zero_enabled is False

    def test_explicit_range(self) -> None:
        (e,) = parse_config(
            one(min_provisioned_concurrency=8, max_provisioned_concurrency=32)
        ).served_entities
        assert e.workload_size is None
        assert (e.min_provisioned_concurrency, e.max_provisioned_concurrency) == (8, 32)

    def test_explicit_zero_min_needs_scale_to_zero(self) -> None:
        (e,) = parse_config(one(min_provisioned_concurrency=0, max_provisioned_concurrency=8)).served_entities
        assert e.min_provisioned_concurrency == 1
        (z,) = parse_config(
            one(min_provisioned_concurrency=0, max_provisioned_concurrency=8, scale_to_zero_enabled=True)
        ).served_entities
        assert z.min_provisioned_concurrency == 0

    @pytest.mark.parametrize("wt", ["CPU", "CPU_MEDIUM", "CPU_LARGE"])
    def test_cpu_workload_types(self, wt: str) -> None:
        assert parse_config(one(workload_type=wt)).served_entities[0].workload_type == wt


BAD_CONFIGS: list[tuple[str, Any, str]] = [
    ("not an object", [], "config"),
    ("missing served_entities", {}, "served_entities"),
    ("served_entities not a list", {"served_entities": {"entity_name": MODEL}}, "list"),
    ("empty served_entities", {"served_entities": []}, "at least one"),
    ("entity not an object", {"served_entities": ["x"]}, "object"),
    ("entity_name missing", {"served_entities": [{"workload_size": "Small"}]}, "entity_name"),
    ("entity_name blank", one(entity_name="  "), "entity_name"),
    ("registered model name without a version", one(entity_name="churn"), "entity_version"),
    ("UC three-part name without a version", one(entity_name="main.default.churn"), "entity_version"),
    ("models:/ URI without a version", one(entity_name="models:/churn"), "names no version"),
    ("models:/ URI and another version", one(entity_name="models:/churn/2", entity_version="3"), "contradicts"),
    ("alias and a version", one(entity_name="models:/churn@champion", entity_version="3"), "omit entity_version"),
    ("version not a number", one(entity_name="churn", entity_version="two"), "positive integer"),
    ("runs:/ without a path", one(entity_name="runs:/abc"), "runs:/<run_id>"),
    ("bad entity name", one(name="has space"), "name"),
    ("entity name with newline", one(name="ok\n"), "name"),
    ("unknown workload_size", one(workload_size="Huge"), "workload_size"),
    ("size and min", one(workload_size="Small", min_provisioned_concurrency=4), "mutually exclusive"),
    ("size and max", one(workload_size="Small", max_provisioned_concurrency=4), "mutually exclusive"),
    ("min above max", one(min_provisioned_concurrency=8, max_provisioned_concurrency=4), "exceeds"),
    ("negative min", one(min_provisioned_concurrency=-4, max_provisioned_concurrency=4), "min"),
    ("negative max", one(max_provisioned_concurrency=-1), "max"),
    ("zero max", one(max_provisioned_concurrency=0), "max"),
    ("min without max", one(min_provisioned_concurrency=4), "max_provisioned_concurrency"),
    ("float concurrency", one(max_provisioned_concurrency=4.5), "integer"),
    ("string concurrency", one(max_provisioned_concurrency="four"), "integer"),
    ("bool concurrency", one(max_provisioned_concurrency=True), "integer"),
    ("huge concurrency", one(max_provisioned_concurrency=100_000), "at most"),
    ("GPU workload", one(workload_type="GPU_SMALL"), "GPU"),
    ("multi-GPU workload", one(workload_type="MULTIGPU_MEDIUM"), "GPU"),
    ("unknown workload_type", one(workload_type="TPU"), "workload_type"),
    ("non-string workload_type", one(workload_type=["CPU"]), "workload_type"),
    ("scale_to_zero not bool", one(scale_to_zero_enabled="yes"), "scale_to_zero_enabled"),
    ("env not an object", one(environment_vars=["A=1"]), "environment_vars"),
    ("env non-string value", one(environment_vars={"A": 1}), "environment_vars"),
    ("env bad key", one(environment_vars={"1BAD": "x"}), "environment_vars"),
    ("env key with =", one(environment_vars={"A=B": "x"}), "environment_vars"),
    ("env key with newline", one(environment_vars={"A\n": "x"}), "environment_vars"),
    ("too many env vars", one(environment_vars={f"V{i}": "x" for i in range(31)}), "limit"),
    ("external model", one(external_model={"name": "gpt"}), "external_model"),
    ("both entity lists", {"served_entities": [{"entity_name": MODEL}], "served_models": []}, "not both"),
    (
        "too many entities",
        {"served_entities": [{"entity_name": MODEL, "name": f"e{i}"} for i in range(16)]},
        "at most",
    ),
    (
        "duplicate entity names",
        {"served_entities": [{"entity_name": MODEL, "name": "a"}, {"entity_name": "/m/b", "name": "a"}]},
        "unique",
    ),
    (
        "two entities without routes",
        {"served_entities": [{"entity_name": MODEL, "name": "a"}, {"entity_name": MODEL, "name": "b"}]},
        "routes",
    ),
]


def two(routes: Any) -> dict[str, Any]:
    return {
        "served_entities": [{"entity_name": MODEL, "name": "a"}, {"entity_name": MODEL, "name": "b"}],
        "traffic_config": routes,
    }


def r(name: Any, pct: Any) -> dict[str, Any]:
    return {"served_model_name": name, "traffic_percentage": pct}


BAD_ROUTES: list[tuple[str, Any, str]] = [
    ("sum below 100", two({"routes": [r("a", 50), r("b", 40)]}), "sum to 100"),
    ("sum above 100", two({"routes": [r("a", 60), r("b", 50)]}), "sum to 100"),
    ("unknown entity", two({"routes": [r("a", 50), r("c", 50)]}), "not a served entity"),
    ("above 100", two({"routes": [r("a", 150), r("b", -50)]}), "[0, 100]"),
    ("negative", two({"routes": [r("a", -10), r("b", 110)]}), "[0, 100]"),
    ("fractional", two({"routes": [r("a", 50.5), r("b", 49.5)]}), "integer"),
    ("string percentage", two({"routes": [r("a", "50"), r("b", "50")]}), "integer"),
    ("entity named twice", two({"routes": [r("a", 50), r("a", 50)]}), "more than once"),
    ("routes not a list", two({"routes": {"a": 100}}), "routes"),
    ("route not an object", two({"routes": ["a"]}), "object"),
    ("traffic_config not an object", two(["a"]), "traffic_config"),
]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [c[1:] for c in BAD_CONFIGS + BAD_ROUTES],
    ids=[c[0] for c in BAD_CONFIGS + BAD_ROUTES],
)
def test_invalid_configs_are_rejected(raw: Any, fragment: str) -> None:
    assert fragment in invalid(raw)


def test_registry_names_get_a_clear_message() -> None:
    message = invalid(one(entity_name="churn"))
    assert "'churn'" in message
    assert "registered model" in message
    assert "models:/churn@<alias>" in message


@pytest.mark.parametrize(
    ("entity", "kind", "uri", "default_name"),
    [
        ({"entity_name": "churn", "entity_version": "3"}, "version", "models:/churn/3", "churn-3"),
        ({"entity_name": "main.default.churn", "entity_version": 2}, "version", "models:/main.default.churn/2",
         "main-default-churn-2"),
        ({"entity_name": "models:/churn/07"}, "version", "models:/churn/7", "churn-7"),
        ({"entity_name": "models:/churn/4", "entity_version": "4"}, "version", "models:/churn/4", "churn-4"),
        ({"entity_name": "models:/churn@champion"}, "alias", "models:/churn@champion", "churn-champion"),
        ({"entity_name": "models:/churn/latest"}, "latest", "models:/churn/latest", "churn-latest"),
        ({"entity_name": "runs:/0a1b2c/model"}, "run", "runs:/0a1b2c/model", "model"),
        ({"entity_name": "mlflow-artifacts:/0/models/m-1/artifacts"}, "uri", "mlflow-artifacts:/0/models/m-1/artifacts",
         "artifacts"),
        ({"entity_name": "/models/churn", "entity_version": "5"}, "local", "/models/churn", "churn-5"),
    ],
)
def test_registry_sources_parse(entity: dict[str, Any], kind: str, uri: str, default_name: str) -> None:
    (spec,) = parse_config({"served_entities": [entity]}).served_entities
    assert spec.source.kind == kind
    assert spec.model_uri == uri
    assert spec.name == default_name
    assert spec.pinned is None


class TestRoutes:
    def test_routes_and_both_key_spellings(self) -> None:
        cfg = parse_config(
            {
                "served_entities": [
                    {"entity_name": MODEL, "name": "a"},
                    {"entity_name": MODEL, "name": "b"},
                    {"entity_name": MODEL, "name": "c"},
                ],
                "traffic_config": {
                    "routes": [
                        r("a", 70),
                        {"served_entity_name": "b", "traffic_percentage": 30},
                        r("c", 0),
                    ]
                },
            }
        )
        assert cfg.routes == (Route("a", 70), Route("b", 30), Route("c", 0))
        assert cfg.to_dict()["traffic_config"]["routes"][1] == {
            "served_model_name": "b",
            "served_entity_name": "b",
            "traffic_percentage": 30,
        }

    def test_single_entity_with_explicit_route(self) -> None:
        cfg = parse_config({**one(name="x"), "traffic_config": {"routes": [r("x", 100)]}})
        assert cfg.routes == (Route("x", 100),)

    def test_legacy_served_models(self) -> None:
        cfg = parse_config(
            {
                "served_models": [
                    {
                        "model_name": "/m/churn",
                        "model_version": "2",
                        "workload_size": "Medium",
                        "scale_to_zero_enabled": True,
                    }
                ]
            }
        )
        (e,) = cfg.served_entities
        assert (e.entity_name, e.entity_version, e.name) == ("/m/churn", "2", "churn-2")
        assert (e.min_provisioned_concurrency, e.max_provisioned_concurrency) == (0, 16)


class TestStoredForm:
    def test_input_dict_round_trips(self) -> None:
        raw = {
            "served_entities": [
                {
                    "entity_name": MODEL,
                    "name": "a",
                    "workload_size": "Large",
                    "scale_to_zero_enabled": True,
                    "environment_vars": {"K": "v"},
                },
                {
                    "entity_name": MODEL,
                    "name": "b",
                    "min_provisioned_concurrency": 2,
                    "max_provisioned_concurrency": 24,
                    "workload_type": "CPU_LARGE",
                    "entity_version": "7",
                },
                {
                    "entity_name": MODEL,
                    "name": "c",
                    "min_provisioned_concurrency": 0,
                    "max_provisioned_concurrency": 8,
                },
            ],
            "traffic_config": {"routes": [r("a", 20), r("b", 80), r("c", 0)]},
        }
        cfg = parse_config(raw)
        again = parse_config(cfg.to_input_dict())
        assert again == cfg
        # the stored form keeps a workload size, not the range it implies
        assert "min_provisioned_concurrency" not in cfg.to_input_dict()["served_entities"][0]
        # the output form always shows the range
        assert cfg.to_dict()["served_entities"][0]["max_provisioned_concurrency"] == 64

    @given(
        size=st.sampled_from([None, "Small", "Medium", "Large"]),
        stz=st.booleans(),
        lo=st.integers(0, 64),
        extra=st.integers(0, 64),
        env=st.dictionaries(
            st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), st.text(max_size=5), max_size=3
        ),
    )
    def test_round_trip_property(
        self, size: str | None, stz: bool, lo: int, extra: int, env: dict[str, str]
    ) -> None:
        entity: dict[str, Any] = {"entity_name": MODEL, "scale_to_zero_enabled": stz, "environment_vars": env}
        if size is None:
            entity.update(min_provisioned_concurrency=lo, max_provisioned_concurrency=max(1, lo + extra))
        else:
            entity["workload_size"] = size
        cfg = parse_config({"served_entities": [entity]})
        assert parse_config(cfg.to_input_dict()) == cfg
        (e,) = cfg.served_entities
        assert 0 <= e.min_provisioned_concurrency <= e.max_provisioned_concurrency
        if size is None:
            expected_min = 1 if lo == 0 and not stz else lo
        else:
            expected_min = 0 if stz else {"Small": 4, "Medium": 8, "Large": 16}[size]
        assert e.min_provisioned_concurrency == expected_min

    def test_deployment_key_ignores_traffic_and_scaling_bounds_but_not_the_model_or_env(self) -> None:
        base = parse_config(one(name="a")).served_entities[0]
        for same_replicas in (
            {"traffic_config": {"routes": [r("a", 100)]}},
            {"served_entities": [{"entity_name": MODEL, "name": "a", "workload_size": "Large"}]},
            {"served_entities": [{"entity_name": MODEL, "name": "a", "scale_to_zero_enabled": True}]},
            {"served_entities": [{"entity_name": MODEL, "name": "a", "min_provisioned_concurrency": 8,
                                  "max_provisioned_concurrency": 32}]},
        ):
            same = parse_config({**one(name="a"), **same_replicas}).served_entities[0]
            assert base.deployment_key() == same.deployment_key(), same_replicas
        for change in (
            {"environment_vars": {"X": "1"}},
            {"entity_version": "2"},
            {"entity_name": "/models/other"},
        ):
            other = parse_config({"served_entities": [{"entity_name": MODEL, "name": "a", **change}]})
            assert other.served_entities[0].deployment_key() != base.deployment_key(), change

    def test_entity_lookup(self) -> None:
        cfg = parse_config(one(name="a"))
        assert isinstance(cfg, EndpointConfig)
        assert cfg.entity("a").name == "a"
        with pytest.raises(KeyError):
            cfg.entity("missing")


class TestPlanReplicas:
    @pytest.mark.parametrize(
        ("max_pc", "per", "cores", "cpu_bound", "replicas", "per_replica"),
        [
            (4, 16, 2, True, 1, 4),  # Small
            (16, 16, 2, True, 1, 16),  # Medium
            (64, 16, 2, True, 2, 32),  # Large on this 2-core machine: capped at the cores
            (64, 16, 8, True, 4, 16),  # Large with room: ceil(64 / 16)
            (64, 16, 1, True, 1, 64),
            (17, 16, 8, True, 2, 9),
            (64, 16, 1, False, 4, 16),  # not CPU-bound: no core cap
            (1, 16, 4, True, 1, 1),
        ],
    )
    def test_examples(
        self, max_pc: int, per: int, cores: int, cpu_bound: bool, replicas: int, per_replica: int
    ) -> None:
        plan = plan_replicas(max_pc, per, cores, cpu_bound=cpu_bound)
        assert plan == ReplicaPlan(replicas, per_replica)
        assert plan.provisioned_concurrency >= max_pc

    def test_zero_concurrency_runs_nothing(self) -> None:
        assert plan_replicas(0, 16, 4).replicas == 0

    @given(
        max_pc=st.integers(1, 1024),
        per=st.integers(1, 64),
        cores=st.integers(1, 128),
        cpu_bound=st.booleans(),
    )
    def test_properties(self, max_pc: int, per: int, cores: int, cpu_bound: bool) -> None:
        plan = plan_replicas(max_pc, per, cores, cpu_bound=cpu_bound)
        wanted = math.ceil(max_pc / per)
        assert plan.replicas == (min(wanted, cores) if cpu_bound else wanted)
        assert plan.provisioned_concurrency >= max_pc
        # each replica admits no more than it must for the replicas together to reach the maximum
        assert (plan.per_replica_concurrency - 1) * plan.replicas < max_pc
        if plan.replicas == wanted:
            assert plan.per_replica_concurrency <= per
