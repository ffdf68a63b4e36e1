"""The OpenAPI 3.1 document of an endpoint's query API (`GET /api/2.0/serving-endpoints/{name}/openapi`).

Pure functions build the document from each served entity's MLflow signature (the JSON forms of
`ModelSignature.inputs/outputs/params`) and its `serving_input_example.json`; `read_entity_schema`
is the one place that touches the disk (`mlflow.models.Model.load`), cached per model directory.
`sample_request` goes the other way: from a document to one request body (used by `berth loadtest`).

This module imports nothing heavy at import time: the CLI imports it too.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from berth.control.spec import is_model_uri

OPENAPI_VERSION = "3.1.0"
INPUT_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
EXAMPLE_FILE = "serving_input_example.json"

# MLflow column types (mlflow.types.DataType and the 2.10+ Array/Object/Map/Any) as JSON Schema.
_COLUMN_TYPES: dict[str, dict[str, Any]] = {
    "boolean": {"type": "boolean"},
    "integer": {"type": "integer", "format": "int32"},
    "long": {"type": "integer", "format": "int64"},
    "float": {"type": "number", "format": "float"},
    "double": {"type": "number", "format": "double"},
    "string": {"type": "string"},
    "binary": {"type": "string", "contentEncoding": "base64"},
    "datetime": {"type": "string", "format": "date-time"},
}
# Sample values for `sample_request`, keyed by JSON Schema type (then format).
_SAMPLES: dict[str, Any] = {"boolean": True, "integer": 0, "number": 0.0, "string": "a", "null": None}
_SAMPLE_FORMATS: dict[str, Any] = {"date-time": "2024-01-01T00:00:00", "float": 0.0, "double": 0.0}
_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error_code": {"type": "string"},
        "message": {"type": "string"},
        "stack_trace": {"type": "string"},
    },
    "required": ["error_code", "message"],
}


@dataclass(frozen=True)
class EntitySchema:
    """What one served entity's model says about its inputs: signature parts as MLflow's JSON, an example.

    `inputs`/`outputs`/`params` are the parsed JSON of `ModelSignature.to_dict()` (None: absent);
    `problem` says why nothing could be read (the model is then described as accepting any input).
    """

    name: str
    inputs: list[dict[str, Any]] | None = None
    outputs: list[dict[str, Any]] | None = None
    params: list[dict[str, Any]] | None = None
    example: Any = None
    problem: str | None = None


# --------------------------------------------------------------------------- reading models (I/O)


def local_model_path(entity_name: str) -> Path | None:
    """The local directory an entity's model lives in (a path or file:// URI), else None."""
    if entity_name.startswith("file:"):
        parsed = urlparse(entity_name)
        return Path(unquote(parsed.path)).expanduser()
    if not is_model_uri(entity_name) or ":" in entity_name:  # a registered model, runs:/, s3://, …
        return None
    return Path(entity_name).expanduser()


_cache: dict[tuple[str, str], tuple[tuple[int, int], EntitySchema]] = {}
_cache_lock = threading.Lock()


def read_entity_schema(served_name: str, entity_name: str) -> EntitySchema:
    """Read an entity's signature and serving example from its model directory (cached per directory,
    re-read when `MLmodel` or the example file changes)."""
    path = local_model_path(entity_name)
    if path is None:
        return EntitySchema(served_name, problem=f"{entity_name} is not a local model directory.")
    mlmodel, example = path / "MLmodel", path / EXAMPLE_FILE
    try:
        stamp = (mlmodel.stat().st_mtime_ns, example.stat().st_mtime_ns if example.is_file() else 0)
    except OSError as exc:
        return EntitySchema(served_name, problem=f"Cannot read {mlmodel}: {exc.strerror or exc}.")
    key = (served_name, str(path.resolve()))
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    schema = _load_entity_schema(served_name, path)
    with _cache_lock:
        _cache[key] = (stamp, schema)
    return schema


def _load_entity_schema(served_name: str, path: Path) -> EntitySchema:
    from mlflow.models import Model

    try:
        model = Model.load(str(path))
    except Exception as exc:
        return EntitySchema(served_name, problem=f"Cannot read the MLflow model at {path}: {exc}")
    parts: dict[str, Any] = {"inputs": None, "outputs": None, "params": None}
    if model.signature is not None:
        for key, text in model.signature.to_dict().items():
            if key in parts and text:
                parts[key] = json.loads(text)
    example = None
    example_path = path / EXAMPLE_FILE
    if example_path.is_file():
        try:
            example = json.loads(example_path.read_text())
        except (OSError, ValueError):
            example = None
    return EntitySchema(served_name, example=example, **parts)


# --------------------------------------------------------------------------- signature → JSON Schema (pure)


def column_type_schema(spec: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of one MLflow column type (a ColSpec's JSON, or an Array/Object/Map item)."""
    kind = spec.get("type")
    if kind in _COLUMN_TYPES:
        return dict(_COLUMN_TYPES[kind])
    if kind == "array":
        return {"type": "array", "items": column_type_schema(spec.get("items", {}))}
    if kind == "object":
        props = spec.get("properties", {})
        out: dict[str, Any] = {
            "type": "object",
            "properties": {name: column_type_schema(sub) for name, sub in props.items()},
        }
        required = [name for name, sub in props.items() if sub.get("required", True)]
        if required:
            out["required"] = required
        return out
    if kind == "map":
        return {"type": "object", "additionalProperties": column_type_schema(spec.get("values", {}))}
    return {}  # "any", or a type this version does not know: anything goes


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]} if schema else schema


def _tensor_schema(dtype: str, shape: list[int]) -> dict[str, Any]:
    """A nested-array JSON Schema for a tensor of `dtype` and `shape` (-1: any length)."""
    if dtype.startswith(("float", "double")):
        leaf: dict[str, Any] = {"type": "number"}
    elif dtype.startswith(("int", "uint")):
        leaf = {"type": "integer"}
    elif dtype == "bool":
        leaf = {"type": "boolean"}
    elif dtype in ("str", "object", "bytes") or dtype.startswith(("<U", "|S")):
        leaf = {"type": "string"}
    else:
        leaf = {}
    if dtype:
        leaf["x-dtype"] = dtype
    schema = leaf
    for dim in reversed(shape):
        schema = {"type": "array", "items": schema}
        if dim >= 0:
            schema["minItems"] = schema["maxItems"] = dim
    return schema


def _is_tensor_schema(inputs: list[dict[str, Any]]) -> bool:
    return bool(inputs) and all(spec.get("type") == "tensor" for spec in inputs)


def _columns_formats(inputs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The four input formats for a column-based signature."""
    named = all("name" in spec for spec in inputs)
    cell = [column_type_schema(spec) for spec in inputs]
    cell = [s if spec.get("required", True) else _nullable(s) for s, spec in zip(cell, inputs, strict=True)]
    row: dict[str, Any] = {"type": "array", "prefixItems": cell, "items": False}
    split: dict[str, Any] = {
        "type": "object",
        "properties": {"data": {"type": "array", "items": row}},
        "required": ["data"],
    }
    formats: dict[str, dict[str, Any]] = {"dataframe_split": split}
    if named:
        names = [spec["name"] for spec in inputs]
        split["properties"] = {
            "columns": {"type": "array", "items": {"type": "string", "enum": names}, "uniqueItems": True,
                        "default": names, "description": "Column names; `data` rows follow this order."},
            **split["properties"],
            "index": {"type": "array"},
        }
        split["required"] = ["columns", "data"]
        record: dict[str, Any] = {
            "type": "object",
            "properties": {spec["name"]: s for spec, s in zip(inputs, cell, strict=True)},
        }
        required = [spec["name"] for spec in inputs if spec.get("required", True)]
        if required:
            record["required"] = required
        formats["dataframe_records"] = {"type": "array", "items": record}
        formats["instances"] = {"type": "array", "items": record}
        formats["inputs"] = {
            "type": "object",
            "properties": {spec["name"]: {"type": "array", "items": s} for spec, s in zip(inputs, cell, strict=True)},
            **({"required": required} if required else {}),
        }
    else:
        formats["dataframe_records"] = {"type": "array", "items": {"type": "object"}}
        formats["instances"] = {"type": "array", "items": cell[0] if len(cell) == 1 else {"type": "array"}}
        formats["inputs"] = {"type": "array", "items": cell[0] if len(cell) == 1 else {"type": "array"}}
    return formats


def _tensor_formats(inputs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`instances` (one item per row) and `inputs` (columnar) for a tensor-based signature."""
    specs = [(spec.get("name"), spec.get("tensor-spec", {})) for spec in inputs]
    if len(specs) == 1 and specs[0][0] is None:
        dtype, shape = specs[0][1].get("dtype", ""), list(specs[0][1].get("shape", [-1]))
        return {"instances": _tensor_schema(dtype, shape), "inputs": _tensor_schema(dtype, shape)}
    props_full = {n: _tensor_schema(t.get("dtype", ""), list(t.get("shape", [-1]))) for n, t in specs if n}
    props_row = {n: _tensor_schema(t.get("dtype", ""), list(t.get("shape", [-1]))[1:]) for n, t in specs if n}
    names = list(props_full)
    return {
        "instances": {"type": "array", "items": {"type": "object", "properties": props_row, "required": names}},
        "inputs": {"type": "object", "properties": props_full, "required": names},
    }


def params_schema(params: list[dict[str, Any]]) -> dict[str, Any]:
    """The `params` object: each ParamSpec with its type, shape and default."""
    props: dict[str, Any] = {}
    for spec in params:
        schema = column_type_schema({"type": spec.get("type")})
        if spec.get("shape"):
            schema = {"type": "array", "items": schema}
        if spec.get("default") is not None:
            schema["default"] = spec["default"]
        props[spec["name"]] = schema
    return {"type": "object", "properties": props, "additionalProperties": False}


def request_schema(entity: EntitySchema) -> dict[str, Any]:
    """The JSON Schema of an invocation body accepted by this entity: exactly one input format, and
    `params` when the signature has a params schema."""
    inputs = entity.inputs
    if not inputs:
        formats: dict[str, dict[str, Any]] = {
            "dataframe_split": {
                "type": "object",
                "properties": {"columns": {"type": "array"}, "data": {"type": "array"}},
                "required": ["data"],
            },
            "dataframe_records": {"type": "array"},
            "instances": {"type": "array"},
            "inputs": {},
        }
    elif _is_tensor_schema(inputs):
        formats = _tensor_formats(inputs)
    else:
        formats = _columns_formats(inputs)
    properties: dict[str, Any] = dict(formats)
    if entity.params:
        properties["params"] = params_schema(entity.params)
    elif not inputs:
        properties["params"] = {"type": "object"}
    return {
        "type": "object",
        "properties": properties,
        "oneOf": [{"required": [fmt]} for fmt in formats],
    }


def response_schema(entity: EntitySchema) -> dict[str, Any]:
    """`{"predictions": ...}` shaped by the output signature (MLflow's scoring-server answer)."""
    outputs = entity.outputs
    if not outputs:
        predictions: dict[str, Any] = {}
    elif _is_tensor_schema(outputs):
        if len(outputs) == 1 and "name" not in outputs[0]:
            spec = outputs[0].get("tensor-spec", {})
            predictions = _tensor_schema(spec.get("dtype", ""), list(spec.get("shape", [-1])))
        else:
            predictions = {"type": "object"}
    elif len(outputs) == 1:
        predictions = {"type": "array", "items": column_type_schema(outputs[0])}
    else:
        predictions = {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {spec["name"]: column_type_schema(spec) for spec in outputs if "name" in spec},
            },
        }
    return {"type": "object", "properties": {"predictions": predictions}, "required": ["predictions"]}


def _component_key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def build_openapi(endpoint: str, entities: list[EntitySchema], server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `POST /serving-endpoints/{endpoint}/invocations`."""
    requests: dict[str, Any] = {}
    responses: dict[str, Any] = {}
    for ent in entities:
        key = _component_key(ent.name)
        requests[f"{key}-request"] = request_schema(ent)
        responses[f"{key}-response"] = response_schema(ent)
    components: dict[str, Any] = {
        "schemas": {**requests, **responses, "error": _ERROR_SCHEMA},
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
    }

    def one_of(schemas: dict[str, Any]) -> dict[str, Any]:
        distinct: dict[str, str] = {}
        for name, schema in schemas.items():
            distinct.setdefault(json.dumps(schema, sort_keys=True), name)
        refs = [{"$ref": f"#/components/schemas/{name}"} for name in distinct.values()]
        if len(refs) == 1:
            return refs[0]
        return {"anyOf": refs}

    notes = [f"- `{ent.name}`: {ent.problem}" for ent in entities if ent.problem]
    description = (
        "Score inputs with the endpoint's model. Send exactly one of "
        + ", ".join(f"`{f}`" for f in INPUT_FORMATS)
        + " (and `params` when the model takes parameters); traffic is split between the served entities "
        + ", ".join(f"`{ent.name}`" for ent in entities)
        + "."
    )
    if notes:
        description += "\n\nNo signature could be read for:\n" + "\n".join(notes)
    media: dict[str, Any] = {"schema": one_of(requests) if requests else {"type": "object"}}
    examples = {
        _component_key(ent.name): {"summary": f"serving_input_example.json of {ent.name}", "value": ent.example}
        for ent in entities
        if ent.example is not None
    }
    if examples:
        media["examples"] = examples
    operation = {
        "operationId": "invoke",
        "summary": f"Query serving endpoint {endpoint}",
        "description": description,
        "requestBody": {"required": True, "content": {"application/json": media}},
        "responses": {
            "200": {
                "description": "Predictions; the `served-model-name` header names the entity that answered.",
                "headers": {"served-model-name": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": one_of(responses) if responses else {"type": "object"}}},
            },
            "default": {
                "description": "A Databricks-shaped error.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/error"}}},
            },
        },
    }
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": f"Serving endpoint {endpoint}", "version": "1"},
        "paths": {f"/serving-endpoints/{endpoint}/invocations": {"post": operation}},
        "components": components,
        "security": [{"bearerAuth": []}],
    }
    if server_url:
        doc["servers"] = [{"url": server_url.rstrip("/")}]
    return doc


# --------------------------------------------------------------------------- document → a request body (pure)


class NoSampleRequest(ValueError):
    """The document has no example and no schema to build a request from."""


def sample_request(doc: dict[str, Any]) -> Any:
    """One request body for the document's invocations path: its first example, else one row built
    from the request schema (`dataframe_split` with each column's type, or one tensor row)."""
    try:
        operation = next(iter(doc["paths"].values()))["post"]
        media = operation["requestBody"]["content"]["application/json"]
    except (KeyError, StopIteration, TypeError, AttributeError) as exc:
        raise NoSampleRequest("the document describes no JSON invocation body") from exc
    for example in (media.get("examples") or {}).values():
        if isinstance(example, dict) and example.get("value") is not None:
            return example["value"]
    if media.get("example") is not None:
        return media["example"]
    schema = _resolve(doc, media.get("schema", {}))
    if "anyOf" in schema:
        schema = _resolve(doc, schema["anyOf"][0])
    props = schema.get("properties", {})
    split = props.get("dataframe_split", {}).get("properties", {})
    columns = split.get("columns", {}).get("default")
    cells = split.get("data", {}).get("items", {}).get("prefixItems")
    if columns and cells:
        return {"dataframe_split": {"columns": columns, "data": [[sample_value(c) for c in cells]]}}
    instances = props.get("instances")
    if instances and instances.get("type") == "array" and instances.get("items"):
        value = sample_value(instances["items"])
        if value is not None:
            return {"instances": [value]}
    raise NoSampleRequest("the model has no signature and no serving_input_example.json")


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node  # type: ignore[no-any-return]


def sample_value(schema: dict[str, Any]) -> Any:
    """A plausible value of a JSON Schema built by this module (first alternative of an anyOf)."""
    if "anyOf" in schema:
        return sample_value(schema["anyOf"][0])
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type")
    if kind == "array":
        count = max(int(schema.get("minItems", 1)), 1)
        return [sample_value(schema.get("items") or {}) for _ in range(count)]
    if kind == "object":
        props = schema.get("properties", {})
        return {name: sample_value(sub) for name, sub in props.items()}
    if schema.get("format") in _SAMPLE_FORMATS:
        return _SAMPLE_FORMATS[schema["format"]]
    if isinstance(kind, str):
        return _SAMPLES.get(kind)
    return None


def endpoint_openapi(endpoint: str, entities: list[tuple[str, str]], server_url: str | None = None) -> dict[str, Any]:
    """The document for an endpoint serving `(served name, entity_name)` pairs (reads the models: blocking)."""
    return build_openapi(endpoint, [read_entity_schema(name, uri) for name, uri in entities], server_url)
