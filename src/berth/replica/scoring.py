"""Scoring that answers exactly as MLflow's scoring server does.

The parsing, schema enforcement and error shapes are MLflow's own functions, so a berth replica
and `mlflow models serve` agree on predictions, statuses, error codes and messages.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any

# Keys Databricks clients may add beside the input; MLflow's parser ignores unknown keys too.
DATABRICKS_EXTRA_KEYS = ("client_request_id", "usage_context")


@dataclass(frozen=True)
class ScoringResult:
    status: int
    body: bytes
    content_type: str


class Scorer:
    """Holds a loaded pyfunc model and scores request bodies against it."""

    def __init__(self, model_uri: str) -> None:
        from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
        from mlflow.pyfunc.scoring_server import load_model_with_mlflow_config

        os.environ[_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name] = "true"
        self.model = load_model_with_mlflow_config(model_uri)
        self.input_schema = self.model.metadata.get_input_schema()

    def score(self, body: bytes, content_type: str) -> ScoringResult:
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import invocations

        try:
            result = invocations(body, content_type, self.model, self.input_schema)
        except MlflowException as exc:
            return ScoringResult(
                exc.get_http_status_code(), exc.serialize_as_json().encode(), "application/json"
            )
        except Exception as exc:  # a failure outside the model call: never take the replica down
            import orjson

            payload = {
                "error_code": "INTERNAL_ERROR",
                "message": f"{type(exc).__name__}: {exc}",
                "stack_trace": traceback.format_exc(),
            }
            return ScoringResult(500, orjson.dumps(payload), "application/json")
        mimetype = result.mimetype
        if mimetype.startswith("text/") and "charset=" not in mimetype.lower():
            mimetype += "; charset=utf-8"  # as MLflow's server (Starlette's Response) labels its text answers
        return ScoringResult(result.status, result.response.encode(), mimetype)


def describe_model(scorer: Scorer) -> dict[str, Any]:
    """What the replica reports about its model (signature presence, flavor)."""
    meta = scorer.model.metadata
    return {
        "has_signature": meta.signature is not None,
        "flavors": sorted(meta.flavors),
    }
