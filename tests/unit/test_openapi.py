"""The OpenAPI document built from MLflow signatures: request bodies MLflow accepts validate, others do not."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from berth.control.openapi import (
    EntitySchema,
    NoSampleRequest,
    build_openapi,
    column_type_schema,
    local_model_path,
    read_entity_schema,
    sample_request,
)

# Signature parts exactly as `ModelSignature.to_dict()` writes them (mlflow 3.x).
COLUMNS = [{"type": "double", "name": "x", "required": True}, {"type": "string", "name": "s", "required": False}]
PARAMS = [
    {"name": "scale", "default": 1.0, "shape": None, "type": "double"},
    {"name": "ids", "default": [1, 2], "shape": [-1], "type": "long"},
]
TENSOR = [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3]}}]
NAMED_TENSORS = [
    {"name": "a", "type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 2]}},
    {"name": "b", "type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}},
]
OUTPUTS = [{"type": "double", "name": "sum", "required": True}, {"type": "string", "name": "label", "required": True}]


def request_validator(doc: dict[str, Any], entity: str) -> jsonschema.Draft202012Validator:
    schema = {**doc["components"]["schemas"][f"{entity}-request"], "$defs": {}}
    return jsonschema.Draft202012Validator(schema)


def assert_valid(doc: dict[str, Any], entity: str, body: Any) -> None:
    request_validator(doc, entity).validate(body)


def assert_invalid(doc: dict[str, Any], entity: str, body: Any) -> None:
    assert not request_validator(doc, entity).is_valid(body), body


def test_document_shape() -> None:
    doc = build_openapi("iris", [EntitySchema("m1", inputs=COLUMNS)], "http://127.0.0.1:8080/")
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": "http://127.0.0.1:8080"}]
    assert list(doc["paths"]) == ["/serving-endpoints/iris/invocations"]
    post = doc["paths"]["/serving-endpoints/iris/invocations"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/m1-request"}
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/m1-response"}
    assert doc["security"] == [{"bearerAuth": []}]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    json.dumps(doc)  # plain JSON throughout


def test_column_signature_accepts_every_dataframe_and_tensor_format() -> None:
    doc = build_openapi("e", [EntitySchema("m", inputs=COLUMNS, params=PARAMS)])
    for body in (
        {"dataframe_split": {"columns": ["x", "s"], "data": [[1.0, "a"], [2.5, None]]}},
        {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}},
        {"dataframe_records": [{"x": 1.0, "s": "a"}, {"x": 2}]},
        {"instances": [{"x": 1.0}]},
        {"inputs": {"x": [1.0, 2.0], "s": ["a", "b"]}},
        {"dataframe_records": [{"x": 1.0}], "params": {"scale": 2.0, "ids": [3]}},
    ):
        assert_valid(doc, "m", body)
    for body in (
        {"dataframe_records": [{"s": "a"}]},                       # required column missing
        {"dataframe_records": [{"x": "not a number"}]},             # wrong type
        {"dataframe_split": {"columns": ["x"], "data": [[1.0, 2.0, 3.0]]}},  # more cells than columns
        {"dataframe_split": {"columns": ["nope"], "data": [[1.0]]}},
        {"dataframe_records": [{"x": 1.0}], "instances": [{"x": 1.0}]},  # two formats at once
        {"params": {"scale": 1.0}},                                  # no input at all
        {"dataframe_records": [{"x": 1.0}], "params": {"unknown": 1}},
        {"dataframe_records": [{"x": 1.0}], "params": {"scale": "big"}},
    ):
        assert_invalid(doc, "m", body)


def test_column_types_map_to_json_schema() -> None:
    assert column_type_schema({"type": "long"}) == {"type": "integer", "format": "int64"}
    assert column_type_schema({"type": "binary"}) == {"type": "string", "contentEncoding": "base64"}
    assert column_type_schema({"type": "datetime"}) == {"type": "string", "format": "date-time"}
    assert column_type_schema({"type": "array", "items": {"type": "boolean"}}) == {
        "type": "array", "items": {"type": "boolean"}}
    assert column_type_schema(
        {"type": "object", "properties": {"a": {"type": "string", "required": True},
                                          "b": {"type": "float", "required": False}}}
    ) == {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "number", "format": "float"}},
          "required": ["a"]}
    assert column_type_schema({"type": "map", "values": {"type": "double"}}) == {
        "type": "object", "additionalProperties": {"type": "number", "format": "double"}}
    assert column_type_schema({"type": "any"}) == {}


def test_tensor_signatures() -> None:
    doc = build_openapi("e", [EntitySchema("t", inputs=TENSOR), EntitySchema("n", inputs=NAMED_TENSORS)])
    assert set(doc["components"]["schemas"]["t-request"]["properties"]) == {"instances", "inputs"}
    assert_valid(doc, "t", {"instances": [[1.0, 2.0, 3.0]]})
    assert_valid(doc, "t", {"inputs": [[1.0, 2.0, 3.0], [0, 0, 0]]})
    assert_invalid(doc, "t", {"instances": [[1.0, 2.0]]})
    assert_invalid(doc, "t", {"dataframe_records": [{"x": 1}]})
    assert_valid(doc, "n", {"inputs": {"a": [[1.0, 2.0]], "b": [7]}})
    assert_valid(doc, "n", {"instances": [{"a": [1.0, 2.0], "b": 7}]})
    assert_invalid(doc, "n", {"instances": [{"a": [1.0, 2.0], "b": 1.5}]})


def test_no_signature_accepts_any_format_but_cannot_sample() -> None:
    doc = build_openapi("e", [EntitySchema("free")])
    for body in ({"dataframe_split": {"columns": ["q"], "data": [[1]]}}, {"instances": [1, 2]}, {"inputs": "x"},
                 {"dataframe_records": [{"a": 1}], "params": {"anything": 1}}):
        assert_valid(doc, "free", body)
    assert_invalid(doc, "free", {"nothing": 1})
    with pytest.raises(NoSampleRequest):
        sample_request(doc)


def test_mlflow_serving_example_is_the_request_example_and_validates() -> None:
    # What mlflow.sklearn.save_model(..., input_example=df) writes to serving_input_example.json.
    example = {"dataframe_split": {"columns": ["x", "s"], "data": [[0.5, "q"], [1.5, "r"]]}}
    doc = build_openapi("e", [EntitySchema("m", inputs=COLUMNS, example=example)])
    media = doc["paths"]["/serving-endpoints/e/invocations"]["post"]["requestBody"]["content"]["application/json"]
    assert media["examples"]["m"]["value"] == example
    assert_valid(doc, "m", example)
    assert sample_request(doc) == example


def test_sample_request_builds_one_valid_row_from_the_schema() -> None:
    columns = [*COLUMNS, {"type": "long", "name": "n", "required": True},
               {"type": "array", "items": {"type": "string"}, "name": "tags", "required": True},
               {"type": "datetime", "name": "t", "required": True}, {"type": "boolean", "name": "b", "required": True}]
    doc = build_openapi("e", [EntitySchema("m", inputs=columns, params=PARAMS)])
    body = sample_request(doc)
    assert body["dataframe_split"]["columns"] == ["x", "s", "n", "tags", "t", "b"]
    assert len(body["dataframe_split"]["data"]) == 1
    assert_valid(doc, "m", body)
    tensor_doc = build_openapi("e", [EntitySchema("t", inputs=TENSOR)])
    assert sample_request(tensor_doc) == {"instances": [[0.0, 0.0, 0.0]]}
    assert_valid(tensor_doc, "t", sample_request(tensor_doc))


def test_traffic_split_entities() -> None:
    same = build_openapi("e", [EntitySchema("a", inputs=COLUMNS), EntitySchema("b", inputs=COLUMNS)])
    post = same["paths"]["/serving-endpoints/e/invocations"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/a-request"}
    assert "`a`, `b`" in post["description"]
    mixed = build_openapi("e", [EntitySchema("a", inputs=COLUMNS), EntitySchema("b", inputs=TENSOR, problem=None)])
    schema = mixed["paths"]["/serving-endpoints/e/invocations"]["post"]["requestBody"]["content"]["application/json"]
    assert schema["schema"] == {"anyOf": [{"$ref": "#/components/schemas/a-request"},
                                          {"$ref": "#/components/schemas/b-request"}]}


def test_response_schema_follows_outputs() -> None:
    doc = build_openapi("e", [EntitySchema("m", inputs=COLUMNS, outputs=OUTPUTS),
                              EntitySchema("one", inputs=COLUMNS, outputs=OUTPUTS[:1])])
    many = doc["components"]["schemas"]["m-response"]
    validator = jsonschema.Draft202012Validator(many)
    assert validator.is_valid({"predictions": [{"sum": 1.0, "label": "row"}]})
    assert not validator.is_valid({"predictions": [{"sum": "x", "label": "row"}]})
    one = jsonschema.Draft202012Validator(doc["components"]["schemas"]["one-response"])
    assert one.is_valid({"predictions": [1.0, 2.0]})
    assert not one.is_valid({"result": [1.0]})


def test_unreadable_model_is_described_not_failed() -> None:
    doc = build_openapi("e", [EntitySchema("m", problem="Cannot read /x/MLmodel: No such file.")])
    post = doc["paths"]["/serving-endpoints/e/invocations"]["post"]
    assert "Cannot read /x/MLmodel" in post["description"]
    assert_valid(doc, "m", {"instances": [1]})


def test_local_model_path() -> None:
    assert local_model_path("/abs/model") == Path("/abs/model")
    assert local_model_path("./rel") == Path("rel")
    assert local_model_path("file:///abs/my%20model") == Path("/abs/my model")
    assert local_model_path("file:/abs/m") == Path("/abs/m")
    for remote in ("runs:/abc/model", "models:/iris/1", "s3://bucket/m", "iris"):
        assert local_model_path(remote) is None


MLMODEL = """\
flavors:
  python_function:
    loader_module: mlflow.pyfunc.model
signature:
  inputs: '[{"type": "double", "name": "x", "required": true}]'
  outputs: null
  params: '[{"name": "scale", "default": 1.0, "shape": null, "type": "double"}]'
"""


def test_read_entity_schema_reads_mlmodel_and_example_and_caches(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text(MLMODEL)
    first = read_entity_schema("m", str(model))
    assert first.problem is None
    assert first.inputs == [{"type": "double", "name": "x", "required": True}]
    assert first.params is not None
    assert first.params[0]["name"] == "scale"
    assert first.example is None
    assert read_entity_schema("m", f"file://{model}") is first  # cached per directory
    example = model / "serving_input_example.json"
    example.write_text('{"dataframe_split": {"columns": ["x"], "data": [[3.0]]}}')
    os.utime(example, ns=(1, 1))  # a stamp that differs from "no file" on any filesystem
    second = read_entity_schema("m", str(model))
    assert second.example == {"dataframe_split": {"columns": ["x"], "data": [[3.0]]}}
    missing = read_entity_schema("m", str(tmp_path / "missing"))
    assert missing.problem is not None
    assert "missing" in missing.problem
    assert read_entity_schema("r", "runs:/abc/model").problem is not None
