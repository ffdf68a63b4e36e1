"""The first real round trip: create an endpoint, query it, delete it."""

from __future__ import annotations


def test_create_query_delete(shared_server, model_zoo, unique_name):
    model = model_zoo("sklearn_classifier")
    view = shared_server.deploy(unique_name, model)
    assert view["config"]["served_entities"][0]["state"]["deployment"] == "DEPLOYMENT_READY"
    body = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.1] * 20, [2.0] * 20]}}
    response = shared_server.invoke(unique_name, body)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 2
    assert response.headers["served-model-name"] == view["config"]["served_entities"][0]["name"]
    assert shared_server.api("DELETE", f"/{unique_name}").status_code == 200
    assert shared_server.api("GET", f"/{unique_name}").status_code == 404
    gone = shared_server.invoke(unique_name, body)
    assert gone.status_code == 404
    assert gone.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
