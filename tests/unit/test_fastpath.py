"""The numeric fast path: which signatures and bodies it takes, and what it leaves to MLflow."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from mlflow.types import ColSpec, Schema, TensorSpec

from berth.replica.fastpath import NumericParser

COLS = ["a", "b", "c"]


@pytest.fixture
def parser() -> NumericParser:
    p = NumericParser.for_schema(Schema([ColSpec("double", c) for c in COLS]))
    assert p is not None
    return p


def test_only_all_double_required_columns_get_a_parser():
    assert NumericParser.for_schema(None) is None
    assert NumericParser.for_schema(Schema([ColSpec("double", "a"), ColSpec("long", "b")])) is None
    assert NumericParser.for_schema(Schema([ColSpec("double", "a"), ColSpec("double", "b", required=False)])) is None
    assert NumericParser.for_schema(Schema([TensorSpec(np.dtype("float64"), (-1, 3))])) is None


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": COLS, "data": [[1, 2.5, 3], [4, 5, 6]]}},
        {"dataframe_split": {"columns": ["c", "a", "b"], "data": [[3, 1, 2.5], [6, 4, 5]]}},
        {"dataframe_records": [{"a": 1, "b": 2.5, "c": 3}, {"c": 6, "b": 5, "a": 4}]},
        {"instances": [{"a": 1, "b": 2.5, "c": 3}, {"a": 4, "b": 5, "c": 6}]},
        {"inputs": {"a": [1, 4], "b": [2.5, 5], "c": [3, 6]}},
        {"dataframe_split": {"columns": COLS, "data": [[1, 2.5, 3], [4, 5, 6]]}, "client_request_id": "x"},
    ],
)
def test_formats_parse_to_the_same_rows_in_schema_order(parser, body):
    table = parser.parse(orjson.dumps(body))
    assert table is not None
    assert table.columns == tuple(COLS)
    assert table.values.dtype == np.float64
    assert table.values.tolist() == [[1.0, 2.5, 3.0], [4.0, 5.0, 6.0]]
    assert list(table.frame().columns) == COLS


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        orjson.dumps({"dataframe_split": {"columns": COLS, "data": [[1, 2, 3]]}, "params": {"k": 1}}),
        orjson.dumps({"dataframe_split": {"columns": COLS, "data": [[1, 2, 3]], "index": [7]}}),
        orjson.dumps({"dataframe_split": {"columns": COLS[:2], "data": [[1, 2]]}}),
        orjson.dumps({"dataframe_split": {"columns": [["a"], "b", "c"], "data": [[1, 2, 3]]}}),  # unhashable
        orjson.dumps({"dataframe_split": {"columns": [*COLS, "d"], "data": [[1, 2, 3, 4]]}}),
        orjson.dumps({"dataframe_split": {"columns": COLS, "data": [[1, "2", 3]]}}),
        orjson.dumps({"dataframe_split": {"columns": COLS, "data": [[1, True, 3]]}}),
        orjson.dumps({"dataframe_split": {"columns": COLS, "data": [[1, None, 3]]}}),
        orjson.dumps({"dataframe_split": {"columns": COLS, "data": [[1, 2]]}}),
        orjson.dumps({"dataframe_split": {"columns": COLS, "data": []}}),
        orjson.dumps({"dataframe_split": {"columns": COLS, "data": [[1, 2**60, 3]]}}),
        orjson.dumps({"dataframe_records": [{"a": 1, "b": 2}]}),
        orjson.dumps({"inputs": {"a": 1, "b": 2, "c": 3}}),
        orjson.dumps({"inputs": [[1, 2, 3]]}),
        orjson.dumps({"dataframe_split": {"columns": COLS, "data": [[1, 2, 3]]}, "instances": []}),
        orjson.dumps({"unknown": 1}),
    ],
)
def test_anything_unusual_is_left_to_mlflow(parser, body):
    assert parser.parse(body) is None
