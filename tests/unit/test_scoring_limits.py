"""A replica's own limits on input (`Scorer.parse`): rows per request and JSON depth, on the numeric fast
path and on MLflow's, answered 400 in Databricks' error shape before MLflow parses anything; bodies
within the limits are parsed as before (real MLflow models, loaded from disk)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from berth.payload import PayloadLimits
from berth.replica.scoring import Parsed, Scorer, ScoringResult
from tests.fixtures import models

LIMITS = PayloadLimits(max_rows=3, max_json_depth=8)
JSON = "application/json"


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Scorer]:
    """`scorer("dataframe_model")`: a loaded model (numeric fast path) or `no_signature_model` (MLflow's path)."""
    root = tmp_path_factory.mktemp("scoring-limits")
    made: dict[str, Scorer] = {}

    def get(kind: str) -> Scorer:
        if kind not in made:
            path: Path = getattr(models, kind)(root / kind)
            made[kind] = Scorer(str(path))
            made[kind].limits = LIMITS
        return made[kind]

    return get


def refused(result: Parsed | ScoringResult, words: str) -> None:
    assert isinstance(result, ScoringResult), result
    assert result.status == 400
    assert result.content_type == JSON
    body = orjson.loads(result.body)
    assert set(body) == {"error_code", "message"}
    assert body["error_code"] == "BAD_REQUEST"
    assert words in body["message"], body


def split(rows: int, cols: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    return {"dataframe_split": {"columns": list(cols), "data": [[1.0] * len(cols)] * rows}}


def nested(levels: int) -> Any:
    value: Any = 1.0
    for _ in range(levels):
        value = [value]
    return value


def test_the_fast_path_takes_rows_up_to_the_limit_and_refuses_more(scorer):
    s = scorer("dataframe_model")
    assert s.fast_path != "none"
    assert isinstance(s.parse(orjson.dumps(split(3)), JSON), Parsed)
    refused(s.parse(orjson.dumps(split(4)), JSON), "the limit is 3 rows per request (BERTH_MAX_ROWS)")
    assert s.score(orjson.dumps(split(3)), JSON).status == 200


def test_a_deep_value_beside_a_fast_path_input_is_refused(scorer):
    s = scorer("dataframe_model")
    body = {**split(1), "client_request_id": nested(7)}  # 1 + 7 = 8 levels: at the limit
    assert isinstance(s.parse(orjson.dumps(body), JSON), Parsed)
    body["usage_context"] = nested(8)
    refused(s.parse(orjson.dumps(body), JSON), "limit of 8 levels")


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["x"], "data": [[1]] * 4}},
        {"dataframe_records": [{"x": 1}] * 4},
        {"instances": [[1, 2]] * 4},
        {"inputs": {"x": [1, 2, 3, 4]}},
    ],
)
def test_mlflows_path_refuses_more_rows_than_the_limit_in_every_format(scorer, body):
    refused(scorer("no_signature_model").parse(orjson.dumps(body), JSON), "has 4 rows")


def test_mlflows_path_refuses_bodies_nested_deeper_than_the_limit(scorer):
    s = scorer("no_signature_model")
    ok = {"inputs": nested(7)}  # 8 levels with the outer object
    assert isinstance(s.parse(orjson.dumps(ok), JSON), Parsed)
    refused(s.parse(orjson.dumps({"inputs": nested(8)}), JSON), "nested deeper than the limit of 8")
    # Deeper than orjson parses at all, and with NaN (which only Python's parser takes): still our 400.
    refused(s.parse(b"[" * 2000 + b"]" * 2000, JSON), "limit of 8")
    refused(s.parse(b'{"inputs": [NaN], "x": ' + b"[" * 20 + b"]" * 20 + b"}", JSON), "limit of 8")
    refused(s.parse(b'{"inputs": [NaN], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON), "limit of 8")


def test_bodies_within_the_limits_get_mlflows_own_answers(scorer):
    s = scorer("no_signature_model")
    nan = s.parse(b'{"dataframe_split": {"columns": ["x"], "data": [[NaN]]}}', JSON)
    assert isinstance(nan, Parsed)  # Python's parser takes NaN; orjson does not
    broken = s.parse(b'{"inputs": [1,', JSON)
    assert isinstance(broken, ScoringResult)
    assert broken.status == 400
    assert b"Ensure that input is a valid JSON" in broken.body  # MLflow's message, not ours


def test_csv_bodies_are_held_to_the_row_limit(scorer):
    s = scorer("dataframe_model")
    assert isinstance(s.parse(b"a,b\n1,2\n3,4\n5,6\n", "text/csv"), Parsed)
    refused(s.parse(b"a,b\n1,2\n3,4\n5,6\n7,8\n", "text/csv"), "has 4 rows")
