"""The environment check on a real server: a model whose requirements Berth's environment does not meet
is served with a warning naming each package, in its state message and in its build logs."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

from tests.conftest import ServerProcess

SKLEARN = importlib.metadata.version("scikit-learn")


def pin(model: Path, into: Path) -> Path:
    """A copy of a logged scikit-learn model asking for scikit-learn 1.0.0 and a package nobody has."""
    shutil.copytree(model, into)
    for name in ("requirements.txt", "conda.yaml"):
        text = (into / name).read_text()
        assert f"scikit-learn=={SKLEARN}" in text
        (into / name).write_text(text.replace(f"scikit-learn=={SKLEARN}", "scikit-learn==1.0.0"))
    with open(into / "requirements.txt", "a") as f:
        f.write("\nberth-not-installed-pkg==1.0\n")
    return into


def state_and_build_logs(server: ServerProcess, name: str, model: Path) -> tuple[str, str]:
    view = server.deploy(name, model)
    (entity,) = view["config"]["served_entities"]
    logs = server.api("GET", f"/{name}/served-models/{entity['name']}/build-logs")
    assert logs.status_code == 200, logs.text
    return entity["state"]["deployment_state_message"], logs.json()["logs"]


def test_mismatched_requirements_are_named_in_the_state_message_and_build_logs(  # type: ignore[no-untyped-def]
        shared_server, model_zoo, unique_name, tmp_path) -> None:
    model = pin(model_zoo("sklearn_classifier"), tmp_path / "pinned-model")
    message, logs = state_and_build_logs(shared_server, unique_name, model)

    warning = (f"Environment warning: scikit-learn==1.0.0 required, {SKLEARN} installed; "
               "berth-not-installed-pkg==1.0 required, not installed.")
    assert message == f"Serving with 1 replica(s) x 4 concurrent requests. {warning}"
    assert warning in logs  # what the replica printed as it loaded the model
    assert logs.index(warning) < logs.index("model loaded, serving on")
    assert logs.count("Environment warning:") == 1  # in both files, each package named once
    response = shared_server.invoke(unique_name, {"dataframe_records": [{f"f{i}": 0.0 for i in range(20)}]})
    assert response.status_code == 200, response.text  # a warning, not a refusal


def test_a_model_that_matches_has_no_warning(shared_server, model_zoo, unique_name) -> None:  # type: ignore[no-untyped-def]
    message, logs = state_and_build_logs(shared_server, unique_name, model_zoo("sklearn_classifier"))

    assert message == "Serving with 1 replica(s) x 4 concurrent requests."
    assert "Environment warning" not in logs
    assert "environment check: the 2 requirement(s) of requirements.txt and conda.yaml are met" in logs
