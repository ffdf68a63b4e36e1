"""`GET /api/2.0/serving-endpoints/{name}/openapi` against a real server: the document describes what the
served model accepts, and the request it suggests is answered 200 by that model."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from databricks.sdk import WorkspaceClient

from berth.control.openapi import sample_request

INVOCATIONS = "/serving-endpoints/{}/invocations"


def fetch(server: Any, name: str, accept: str = "text/plain") -> dict[str, Any]:
    response = server.api("GET", f"/{name}/openapi", headers={"Accept": accept})
    assert response.status_code == 200, response.text
    return json.loads(response.text)  # type: ignore[no-any-return]


def request_schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    post = doc["paths"][INVOCATIONS.format(name)]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]  # type: ignore[no-any-return]


def test_openapi_of_a_classifier_endpoint(shared_server, model_zoo, unique_name) -> None:
    model = model_zoo("sklearn_classifier")
    shared_server.deploy(unique_name, f"file://{model}")

    response = shared_server.api("GET", f"/{unique_name}/openapi", headers={"Accept": "text/plain"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    doc = json.loads(response.text)
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": shared_server.url}]
    assert list(doc["paths"]) == [INVOCATIONS.format(unique_name)]

    # The model's own serving example is the request example, and it fits the schema.
    saved_example = json.loads((model / "serving_input_example.json").read_text())
    media = doc["paths"][INVOCATIONS.format(unique_name)]["post"]["requestBody"]["content"]["application/json"]
    assert [e["value"] for e in media["examples"].values()] == [saved_example]
    validator = jsonschema.Draft202012Validator(request_schema(doc, unique_name))
    validator.validate(saved_example)
    columns = saved_example["dataframe_split"]["columns"]
    validator.validate({"dataframe_records": [dict.fromkeys(columns, 0.5)]})
    assert not validator.is_valid({"dataframe_records": [{"f0": "text"}]})

    # What the document suggests, the endpoint answers.
    answer = shared_server.invoke(unique_name, sample_request(doc))
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == len(saved_example["dataframe_split"]["data"])

    # Asked for JSON, it says so in the content type; same document.
    assert fetch(shared_server, unique_name, accept="application/json") == doc

    # The official SDK's call (Accept: text/plain, raw body).
    sdk = WorkspaceClient(host=shared_server.url, token=shared_server.token, auth_type="pat")
    raw = sdk.serving_endpoints.get_open_api(unique_name).contents
    assert raw is not None
    assert json.loads(raw.read()) == doc


def test_openapi_built_from_the_signature_when_there_is_no_example(shared_server, model_zoo, unique_name) -> None:
    model = model_zoo("params_model")
    assert not (model / "serving_input_example.json").exists()
    shared_server.deploy(unique_name, model)
    doc = fetch(shared_server, unique_name)
    schema = request_schema(doc, unique_name)
    assert schema["properties"]["params"]["properties"]["scale"] == {"type": "number", "format": "double",
                                                                     "default": 1.0}
    body = sample_request(doc)
    assert body == {"dataframe_split": {"columns": ["x"], "data": [[0.0]]}}
    body["params"] = {"scale": 3.0}
    jsonschema.Draft202012Validator(schema).validate(body)
    answer = shared_server.invoke(unique_name, {"dataframe_split": {"columns": ["x"], "data": [[2.0]]},
                                                "params": {"scale": 3.0}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == [6.0]


def test_openapi_of_an_unknown_endpoint_is_a_databricks_404(shared_server) -> None:
    response = shared_server.api("GET", "/no-such-endpoint-here/openapi", headers={"Accept": "text/plain"})
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"error_code", "message"}
    assert body["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert "no-such-endpoint-here" in body["message"]
