"""The official clients work unchanged against Berth: `databricks-sdk` and `mlflow.deployments`.

Create and update return at once with `config_update: IN_PROGRESS`; the clients then poll GET
(the SDK's waiters) until NOT_UPDATING, or raise when the update fails.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import pytest
import requests
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import NotFound, OperationFailed, ResourceDoesNotExist
from databricks.sdk.service.serving import (
    DataframeSplitInput,
    EndpointCoreConfigInput,
    EndpointStateConfigUpdate,
    EndpointStateReady,
    ServedEntityInput,
    ServingEndpointDetailedPermissionLevel,
)

pytestmark = pytest.mark.both_stores  # every server test here runs on SQLite and on PostgreSQL

FEATURES = [f"f{i}" for i in range(20)]
WAIT = timedelta(seconds=180)


@pytest.fixture(scope="module")
def ws(shared_server: Any) -> WorkspaceClient:
    return WorkspaceClient(host=shared_server.url, token=shared_server.token, auth_type="pat")


@pytest.fixture
def databricks_env(shared_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """What `get_deploy_client("databricks")` reads: DATABRICKS_HOST/DATABRICKS_TOKEN, nothing else."""
    for key in list(os.environ):
        if key.startswith("DATABRICKS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.databrickscfg profile can interfere
    monkeypatch.setenv("DATABRICKS_HOST", shared_server.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", shared_server.token)


def _entity(model: Any, **extra: Any) -> ServedEntityInput:
    return ServedEntityInput(
        entity_name=str(model), workload_size="Small", scale_to_zero_enabled=False, **extra
    )


def test_sdk_endpoint_lifecycle(ws, model_zoo, unique_name):
    classifier, tensor = model_zoo("sklearn_classifier"), model_zoo("tensor_model")

    config = EndpointCoreConfigInput(name=unique_name, served_entities=[_entity(classifier)])
    waiter = ws.serving_endpoints.create(name=unique_name, config=config)
    assert waiter.response.name == unique_name
    assert waiter.response.state.config_update == EndpointStateConfigUpdate.IN_PROGRESS
    assert waiter.response.state.ready == EndpointStateReady.NOT_READY
    created = waiter.result(timeout=WAIT)
    assert created.state.config_update == EndpointStateConfigUpdate.NOT_UPDATING
    assert created.state.ready == EndpointStateReady.READY
    assert created.config.config_version == 1
    (entity,) = created.config.served_entities
    assert entity.entity_name == str(classifier)
    assert entity.state.deployment.value == "DEPLOYMENT_READY"

    got = ws.serving_endpoints.get(unique_name)
    assert got.id == created.id
    assert got.permission_level == ServingEndpointDetailedPermissionLevel.CAN_MANAGE
    assert got.config.traffic_config.routes[0].traffic_percentage == 100
    assert got.pending_config is None

    listed = {ep.name: ep for ep in ws.serving_endpoints.list()}
    assert unique_name in listed
    assert listed[unique_name].state.ready == EndpointStateReady.READY
    assert [e.entity_name for e in listed[unique_name].config.served_entities] == [str(classifier)]

    records = ws.serving_endpoints.query(
        unique_name, dataframe_records=[dict.fromkeys(FEATURES, 0.1), dict.fromkeys(FEATURES, 2.0)]
    )
    assert len(records.predictions) == 2
    assert all(p in (0, 1, 2) for p in records.predictions)
    assert records.served_model_name == entity.name
    split = ws.serving_endpoints.query(
        unique_name, dataframe_split=DataframeSplitInput(columns=FEATURES, data=[[0.1] * 20, [2.0] * 20])
    )
    assert split.predictions == records.predictions

    update = ws.serving_endpoints.update_config(unique_name, served_entities=[_entity(tensor)])
    assert update.response.state.config_update == EndpointStateConfigUpdate.IN_PROGRESS
    assert update.response.pending_config is not None
    # The old config keeps serving while the new one loads.
    during = ws.serving_endpoints.query(unique_name, dataframe_records=[dict.fromkeys(FEATURES, 0.1)])
    assert during.predictions == records.predictions[:1]
    updated = update.result(timeout=WAIT)
    assert updated.state.config_update == EndpointStateConfigUpdate.NOT_UPDATING
    assert updated.config.config_version == 2
    assert [e.entity_name for e in updated.config.served_entities] == [str(tensor)]
    tensors = ws.serving_endpoints.query(unique_name, inputs=[[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]])
    assert tensors.predictions == pytest.approx([6.0, 1.0])

    ws.serving_endpoints.delete(unique_name)
    with pytest.raises(ResourceDoesNotExist):
        ws.serving_endpoints.get(unique_name)
    assert unique_name not in {ep.name for ep in ws.serving_endpoints.list()}
    with pytest.raises(NotFound):
        ws.serving_endpoints.query(unique_name, dataframe_records=[{"x": 1.0}])


def test_sdk_create_and_wait_raises_when_the_model_cannot_load(ws, model_zoo, unique_name):
    broken = model_zoo("broken_load_model")
    started = time.monotonic()
    with pytest.raises(OperationFailed, match="UPDATE_FAILED"):
        ws.serving_endpoints.create_and_wait(
            name=unique_name,
            config=EndpointCoreConfigInput(name=unique_name, served_entities=[_entity(broken)]),
            timeout=WAIT,
        )
    assert time.monotonic() - started < 120
    view = ws.serving_endpoints.get(unique_name)
    assert view.state.config_update == EndpointStateConfigUpdate.UPDATE_FAILED
    assert view.state.ready == EndpointStateReady.NOT_READY
    (entity,) = view.config.served_entities
    assert entity.state.deployment.value == "DEPLOYMENT_FAILED"
    assert "weights file is corrupt" in entity.state.deployment_state_message
    ws.serving_endpoints.delete(unique_name)


def test_sdk_failed_update_raises_and_the_old_config_keeps_serving(ws, model_zoo, unique_name):
    tensor, broken = model_zoo("tensor_model"), model_zoo("broken_load_model")
    ws.serving_endpoints.create_and_wait(
        name=unique_name,
        config=EndpointCoreConfigInput(name=unique_name, served_entities=[_entity(tensor)]),
        timeout=WAIT,
    )
    with pytest.raises(OperationFailed, match="UPDATE_FAILED"):
        ws.serving_endpoints.update_config_and_wait(
            unique_name, served_entities=[_entity(broken)], timeout=WAIT
        )
    view = ws.serving_endpoints.get(unique_name)
    assert view.state.config_update == EndpointStateConfigUpdate.UPDATE_FAILED
    assert view.state.ready == EndpointStateReady.READY
    assert view.config.config_version == 1
    assert [e.entity_name for e in view.config.served_entities] == [str(tensor)]
    still = ws.serving_endpoints.query(unique_name, inputs=[[1.0, 1.0, 1.0]])
    assert still.predictions == pytest.approx([3.0])
    ws.serving_endpoints.delete(unique_name)


def _poll_not_updating(client: Any, name: str, timeout: float = 180.0) -> Any:
    """What a user of mlflow.deployments does after create/update: poll get_endpoint."""
    deadline = time.monotonic() + timeout
    while True:
        endpoint = client.get_endpoint(endpoint=name)
        if endpoint["state"]["config_update"] != "IN_PROGRESS":
            return endpoint
        assert time.monotonic() < deadline, f"{name} still updating: {endpoint}"
        time.sleep(0.2)


def test_mlflow_deployments_client(databricks_env, model_zoo, unique_name):
    from mlflow.deployments import get_deploy_client

    classifier, tensor = model_zoo("sklearn_classifier"), model_zoo("tensor_model")
    client = get_deploy_client("databricks")

    created = client.create_endpoint(
        config={
            "name": unique_name,
            "config": {"served_entities": [{"entity_name": str(classifier), "workload_size": "Small"}]},
            "tags": [{"key": "team", "value": "ml"}],
        }
    )
    assert created["name"] == unique_name
    assert created["state"]["config_update"] == "IN_PROGRESS"
    ready = _poll_not_updating(client, unique_name)
    assert ready["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    assert ready["tags"] == [{"key": "team", "value": "ml"}]
    assert ready.config["served_entities"][0]["entity_name"] == str(classifier)

    assert unique_name in [ep["name"] for ep in client.list_endpoints()]

    prediction = client.predict(
        endpoint=unique_name,
        inputs={"dataframe_split": {"columns": FEATURES, "data": [[0.1] * 20, [2.0] * 20]}},
    )
    assert len(prediction["predictions"]) == 2
    records = client.predict(
        endpoint=unique_name, inputs={"dataframe_records": [dict.fromkeys(FEATURES, 0.1)]}
    )
    assert records.predictions == prediction["predictions"][:1]

    updated = client.update_endpoint(
        endpoint=unique_name,
        config={"served_entities": [{"entity_name": str(tensor), "workload_size": "Small"}]},
    )
    assert updated["state"]["config_update"] == "IN_PROGRESS"
    after = _poll_not_updating(client, unique_name)
    assert after["state"]["ready"] == "READY"
    assert after["config"]["config_version"] == 2
    assert [e["entity_name"] for e in after["config"]["served_entities"]] == [str(tensor)]
    assert client.predict(endpoint=unique_name, inputs={"inputs": [[1.0, 2.0, 3.0]]})["predictions"] == (
        pytest.approx([6.0])
    )

    client.update_endpoint_config(
        endpoint=unique_name, config={"served_entities": [{"entity_name": str(classifier)}]}
    )
    assert _poll_not_updating(client, unique_name)["config"]["config_version"] == 3

    client.delete_endpoint(endpoint=unique_name)
    assert unique_name not in [ep["name"] for ep in client.list_endpoints()]
    # mlflow raises the SDK's NotFound or requests' HTTPError, depending on its retry path.
    with pytest.raises((requests.HTTPError, NotFound)) as raised:
        client.get_endpoint(endpoint=unique_name)
    if isinstance(raised.value, requests.HTTPError):
        assert raised.value.response.status_code == 404
    assert f"Endpoint '{unique_name}' does not exist" in str(raised.value)
