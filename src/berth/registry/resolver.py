"""Resolve a remote `ModelSource` through the MLflow tracking server and registry, to a `PinnedModel`.

Runs when a config is accepted (create or update): an alias or `latest` is pinned to the version it names
then, so moving the alias changes nothing until the endpoint is updated, and a restart never re-resolves.
MLflow's own client does the talking (auth, retries, every registry and artifact store MLflow supports);
it is imported on first use, so a platform serving only local models never loads it.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from berth.errors import (
    BerthError,
    InvalidParameterValue,
    ResourceDoesNotExist,
    TemporarilyUnavailable,
)
from berth.registry.cache import redact
from berth.registry.sources import ModelSource, PinnedModel

# MLflow's client retries a failed call 7 times with exponential backoff (minutes); a create request
# waits on these calls, so Berth asks for fewer unless the user set them.
_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}



def client_defaults() -> None:
    """Berth's defaults for MLflow's HTTP retries and timeout, unless the user set them."""
    for key, value in _CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


class Resolver:
    """Pins sources with an `MlflowClient` on one tracking server (blocking calls: run them in a thread)."""

    def __init__(self, tracking_uri: str | None) -> None:
        self.tracking_uri = tracking_uri
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            client_defaults()
            import mlflow
            from mlflow import MlflowClient

            # Some of MLflow's lookups (a run's logged model behind runs:/…) ask the process-wide tracking
            # server rather than the client's: in Berth's process it is this one.
            if self.tracking_uri is not None:
                mlflow.set_tracking_uri(self.tracking_uri)
                mlflow.set_registry_uri(self.tracking_uri)

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def resolve(self, source: ModelSource) -> PinnedModel:
        """Pin `source`; 400/403/404/503 with the registry's own words when it cannot be."""
        if not source.remote:
            raise ValueError("a local source needs no resolving")
        if self.tracking_uri is None:
            raise InvalidParameterValue(
                f"{source.uri} is served from an MLflow tracking server, and none is configured: start Berth "
                "with BERTH_MLFLOW_TRACKING_URI (or MLFLOW_TRACKING_URI) set, e.g. http://127.0.0.1:5000.")
        try:
            pinned = self._pin(source)
            self._check_model(source, pinned)
        except BerthError:
            raise
        except Exception as exc:
            raise _registry_error(source, exc) from exc
        return pinned

    def _pin(self, source: ModelSource) -> PinnedModel:
        client = self.client()
        if source.kind in ("version", "alias", "latest"):
            if source.kind == "version":
                mv = client.get_model_version(source.name, source.ref)
            elif source.kind == "alias":
                mv = client.get_model_version_by_alias(source.name, source.ref)
            else:
                client.get_registered_model(source.name)  # 404 for an unknown model
                quoted = source.name.replace("'", "\\'")
                newest = client.search_model_versions(f"name='{quoted}'", max_results=1,
                                                      order_by=["version_number DESC"])
                if not newest:
                    raise ResourceDoesNotExist(f"Registered model '{source.name}' has no version.")
                mv = newest[0]
            uri = client.get_model_version_download_uri(source.name, str(mv.version))
            return PinnedModel(uri, str(mv.version), mv.run_id or None)
        if source.kind == "logged":
            model = client.get_logged_model(source.ref)
            return PinnedModel(str(model.artifact_location), None, model.source_run_id or None)
        if source.kind == "run":
            run = client.get_run(source.name)  # 404 for an unknown run, before any artifact call
            # MLflow 3 keeps a model logged in a run as a logged model of that name, stored apart from the
            # run's artifacts; older models are the run's artifacts themselves.
            logged = _logged_model(client, run.info.experiment_id, source.name, source.ref)
            if logged is not None:
                return PinnedModel(logged, None, source.name)
            from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

            return PinnedModel(RunsArtifactRepository.get_underlying_uri(source.uri, tracking_uri=self.tracking_uri),
                               None, source.name)
        return PinnedModel(source.ref)

    def _check_model(self, source: ModelSource, pinned: PinnedModel) -> None:
        import mlflow.artifacts

        names = {posixpath.basename(f.path) for f in mlflow.artifacts.list_artifacts(
            artifact_uri=pinned.artifact_uri, tracking_uri=self.tracking_uri)}
        if "MLmodel" not in names:
            raise InvalidParameterValue(
                f"{source.uri} ({pinned.artifact_uri}) is not an MLflow model: it has no MLmodel file.")


def _logged_model(client: Any, experiment_id: str, run_id: str, name: str) -> str | None:
    """The artifact location of the model `name` logged by run `run_id` (MLflow 3), or None."""
    if "/" in name or not hasattr(client, "search_logged_models"):
        return None
    quoted = name.replace("'", "\\'")
    token = None
    while True:
        page = client.search_logged_models(experiment_ids=[experiment_id], filter_string=f"name = '{quoted}'",
                                           page_token=token)
        for model in page:
            if model.source_run_id == run_id:
                return str(model.artifact_location)
        token = page.token
        if not token:
            return None


def _registry_error(source: ModelSource, exc: Exception) -> BerthError:
    code = getattr(exc, "error_code", "")
    text = getattr(exc, "message", None) or str(exc)
    text = redact(text.splitlines()[0][:500]) if text else type(exc).__name__
    text = text.removeprefix(f"{code}: ") if code else text
    if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (code == "INVALID_PARAMETER_VALUE" and "not found" in text):
        return ResourceDoesNotExist(f"{source.uri}: {text}")
    if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
        return InvalidParameterValue(f"{source.uri}: {text}")
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):  # Berth's own credentials: not the caller's fault
        return TemporarilyUnavailable(f"{source.uri}: the MLflow tracking server refused Berth's credentials "
                                      f"({text}); the platform's operator must fix BERTH_MLFLOW_TRACKING_URI's "
                                      "credentials.", retry_after=30)
    return TemporarilyUnavailable(f"Could not resolve {source.uri} through the MLflow tracking server: {text}",
                                  retry_after=5)
