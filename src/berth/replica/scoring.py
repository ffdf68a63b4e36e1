"""Scoring that answers exactly as MLflow's scoring server does, one request or a batch at a time.

MLflow's `invocations` is split in two phases with MLflow's own functions: `parse` (content type,
JSON/CSV parsing, input formats) and `predict` (the model call, its error handling and the JSON
encoding). Between them, requests with the same input shape are merged into one model call and
the predictions split back (`berth.replica.batching`); a merged call that fails is retried one
request at a time, so a bad request fails alone with exactly MLflow's answer.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass
from io import BytesIO, StringIO
from typing import Any

import orjson

from berth.errors import BerthError
from berth.payload import PayloadLimits, is_depth_error, rows_in, too_deep, too_deep_error, too_many_rows_error
from berth.replica import batching
from berth.replica.fastpath import IGNORED_KEYS, NumericParser, Table
from berth.runtimes.pyfunc import table_predictor

log = logging.getLogger("berth.replica")

# Keys Databricks clients may add beside the input; MLflow's parser ignores unknown keys too.
DATABRICKS_EXTRA_KEYS = ("client_request_id", "usage_context")


@dataclass(frozen=True)
class ScoringResult:
    status: int
    body: bytes
    content_type: str


@dataclass(frozen=True)
class Parsed:
    """A request's model input, ready for `predict`."""

    data: Any
    params: dict[str, Any] | None
    unified_llm: bool


class Scorer:
    """Holds a loaded pyfunc model and scores request bodies against it."""

    def __init__(self, model_uri: str) -> None:
        from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
        from mlflow.pyfunc.scoring_server import load_model_with_mlflow_config

        os.environ[_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name] = "true"
        self.model_uri = model_uri
        self.model = load_model_with_mlflow_config(model_uri)
        self.input_schema = self.model.metadata.get_input_schema()
        self._takes_params = "params" in inspect.signature(self.model.predict).parameters
        self.numeric = NumericParser.for_schema(self.input_schema)
        self.row_cap = batching.row_cap(self.input_schema)
        self.table_predictor = table_predictor(self.model, self.numeric.columns) if self.numeric else None
        self.batches = 0
        self.batched_requests = 0
        self.largest_batch = 0
        self.model_call_s = 0.0  # seconds spent in model calls so far (the batcher times calls with it)
        self.model_calls = 0  # model calls so far
        self.model_call_requests = 0  # requests those calls scored (÷ model_calls: the mean batch size)
        self.limits = PayloadLimits()  # JSON depth and rows per request (the replica's serve sets the platform's)

    def warm_up(self) -> bool:
        """Score the model's own serving example once, so that lazy initialisation (and, in a template,
        the pages it touches) happens before traffic. False when there is no example or it fails."""
        path = self.model_uri.removeprefix("file://")
        if not os.path.isdir(path):
            return False
        try:
            example = self.model.metadata.get_serving_input(path)
        except Exception:
            return False
        if not example:
            return False
        counters = self.model_call_s, self.model_calls, self.model_call_requests
        result = self.score(example.encode(), "application/json")
        # The batcher's estimate of a call, and the call metrics, start from real traffic.
        self.model_call_s, self.model_calls, self.model_call_requests = counters
        return result.status == 200

    @property
    def fast_path(self) -> str:
        """How fast-parsed rows reach the model: "array", "frame", "mlflow" (MLflow's predict), or "none"."""
        if self.numeric is None:
            return "none"
        return self.table_predictor.kind if self.table_predictor is not None else "mlflow"

    # One request
    def score(self, body: bytes, content_type: str) -> ScoringResult:
        parsed = self.parse(body, content_type)
        return parsed if isinstance(parsed, ScoringResult) else self.predict(parsed)

    def parse(self, body: bytes, content_type: str) -> Parsed | ScoringResult:
        """MLflow's `invocations` up to the model call: the same checks, parsers and errors."""
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import (
            CONTENT_TYPE_CSV,
            CONTENT_TYPE_JSON,
            CONTENT_TYPE_PARQUET,
            CONTENT_TYPES,
            SCORING_PROTOCOL_CHANGE_INFO,
            _parse_json_data,
            parse_csv_input,
            parse_parquet_input,
        )
        from mlflow.utils.proto_json_utils import MlflowInvalidInputException

        type_parts = list(map(str.strip, content_type.split(";")))
        mime_type = type_parts[0]
        parameter_values = {key: value for pair in type_parts[1:] for key, _, value in [pair.partition("=")]}
        if parameter_values.get("charset", "utf-8").lower() != "utf-8":
            return _text(415, "The scoring server only supports UTF-8")
        if unexpected := set(parameter_values.keys()).difference({"charset"}):
            return _text(
                415,
                f"Unrecognized content type parameters: {', '.join(unexpected)}. {SCORING_PROTOCOL_CHANGE_INFO}",
            )
        if mime_type == CONTENT_TYPE_JSON:
            checked = self._check_json(body)
            if checked is not None:
                return checked
        try:
            if mime_type == CONTENT_TYPE_CSV:
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError as ex:
                    raise MlflowInvalidInputException(
                        f"Ensure that input is a valid UTF-8 encoded string. Error: '{ex!r}'"
                    ) from ex
                return self._frame(parse_csv_input(csv_input=StringIO(text), schema=self.input_schema))
            if mime_type == CONTENT_TYPE_JSON:
                parsed = _parse_json_data(body, self.model.metadata, self.input_schema)
                return Parsed(parsed.data, parsed.params, parsed.is_unified_llm_input)
            if mime_type == CONTENT_TYPE_PARQUET:
                return self._frame(parse_parquet_input(parquet_input=BytesIO(body)))
        except MlflowException as exc:
            return _mlflow_error(exc)
        except Exception as exc:  # outside MLflow's own errors: never take the replica down
            return _internal_error(exc)
        return _text(
            415,
            f"This predictor only supports the following content types: Types: {CONTENT_TYPES}. "
            f"Got '{content_type}'.",
        )

    def _check_json(self, body: bytes) -> Parsed | ScoringResult | None:
        """A JSON body's limits, checked before MLflow parses it: the refusal, the fast path's rows, or None
        (MLflow's parser goes on). orjson parses it once; the fast path's tables are 4 deep at most, so only
        the bodies it does not take are walked for their depth (~1 µs per row, next to MLflow's ~15)."""
        limits = self.limits
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:  # deeper than orjson goes, or JSON only Python's parser takes (NaN)
            if is_depth_error(exc):
                return _refusal(too_deep_error(limits.max_json_depth))
            try:
                obj = json.loads(body)
            except RecursionError:
                return _refusal(too_deep_error(limits.max_json_depth))
            except ValueError:  # not JSON: MLflow's parser says so in its own words
                return None
        else:
            if self.numeric is not None and (table := self.numeric.parse_obj(obj)) is not None:
                if len(table) > limits.max_rows:
                    return _refusal(too_many_rows_error(len(table), limits.max_rows))
                if len(obj) > 1 and any(too_deep(obj[k], limits.max_json_depth - 1)
                                        for k in IGNORED_KEYS if k in obj):  # what it ignores beside the rows
                    return _refusal(too_deep_error(limits.max_json_depth))
                return Parsed(table, None, False)
        rows = rows_in(obj)
        if rows > limits.max_rows:
            return _refusal(too_many_rows_error(rows, limits.max_rows))
        if too_deep(obj, limits.max_json_depth):
            return _refusal(too_deep_error(limits.max_json_depth))
        return None

    def _frame(self, frame: Any) -> Parsed | ScoringResult:
        """A parsed CSV or Parquet body, unless it has more rows than the limit."""
        if len(frame) > self.limits.max_rows:
            return _refusal(too_many_rows_error(len(frame), self.limits.max_rows))
        return Parsed(frame, None, False)

    def predict(self, parsed: Parsed) -> ScoringResult:
        """MLflow's model call and encoding for one request."""
        from mlflow.exceptions import MlflowException

        try:
            raw = self._call_model(parsed.data, parsed.params)
            return self._encode(raw, parsed.unified_llm)
        except MlflowException as exc:
            return _mlflow_error(exc)
        except Exception as exc:
            return _internal_error(exc)

    def _call_model(self, data: Any, params: dict[str, Any] | None, requests: int = 1) -> Any:
        started = time.perf_counter()
        try:
            return self._call_model_untimed(data, params)
        finally:
            self.model_call_s += time.perf_counter() - started
            self.model_calls += 1
            self.model_call_requests += requests

    def _call_model_untimed(self, data: Any, params: dict[str, Any] | None) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import BAD_REQUEST

        if isinstance(data, Table):
            if self.table_predictor is not None and params is None:
                try:
                    return self.table_predictor.predict(data.values)
                except Exception:
                    pass  # MLflow's own path below gives this input MLflow's own answer
            data = data.frame()
        try:
            if self._takes_params:
                return self.model.predict(data, params=params)
            if params:
                from mlflow.pyfunc.model import _log_warning_if_params_not_in_predict_signature

                _log_warning_if_params_not_in_predict_signature(log, params)
            return self.model.predict(data)
        except MlflowException as e:
            e.message = f"Failed to predict data '{data}'. \nError: {e.message}"
            raise
        except Exception as exc:
            raise MlflowException(
                message=(
                    "Encountered an unexpected error while evaluating the model. Verify"
                    " that the serialized input Dataframe is compatible with the model for"
                    " inference."
                ),
                error_code=BAD_REQUEST,
                stack_trace=traceback.format_exc(),
            ) from exc

    def _encode(self, raw: Any, unified_llm: bool) -> ScoringResult:
        from mlflow.pyfunc.scoring_server import predictions_to_json, unwrapped_predictions_to_json

        out = StringIO()
        (unwrapped_predictions_to_json if unified_llm else predictions_to_json)(raw, out)
        return ScoringResult(200, out.getvalue().encode(), "application/json")

    # Many requests
    def score_many(self, requests: list[tuple[bytes, str]]) -> list[ScoringResult]:
        """Score requests that arrived together: same-shaped inputs share one model call."""
        results: list[ScoringResult | None] = [None] * len(requests)
        parsed: dict[int, Parsed] = {}
        for i, (body, content_type) in enumerate(requests):
            p = self.parse(body, content_type)
            if isinstance(p, ScoringResult):
                results[i] = p
            else:
                parsed[i] = p
        for group in batching.group_requests(
            {i: (p.data, p.params if not p.unified_llm else batching.UNBATCHABLE) for i, p in parsed.items()},
            self.row_cap,
        ):
            if len(group) > 1 and (merged := self._predict_merged([parsed[i] for i in group])) is not None:
                for i, result in zip(group, merged, strict=True):
                    results[i] = result
                self.batches += 1
                self.batched_requests += len(group)
                self.largest_batch = max(self.largest_batch, len(group))
            else:
                for i in group:
                    results[i] = self.predict(parsed[i])
        return results  # type: ignore[return-value]

    def _predict_merged(self, group: list[Parsed]) -> list[ScoringResult] | None:
        """One model call for the group, split back per request; None to score them one by one."""
        merged, counts = batching.merge([p.data for p in group])
        try:
            raw = self._call_model(merged, group[0].params, len(group))
        except Exception:
            return None  # someone's input is bad: each request gets its own answer
        parts = batching.split(raw, counts)
        if parts is None:
            return None
        try:
            return [self._encode(part, False) for part in parts]
        except Exception:
            return None


def _text(status: int, message: str) -> ScoringResult:
    # As MLflow's server (Starlette's Response) labels its text answers.
    return ScoringResult(status, message.encode(), "text/plain; charset=utf-8")


def _refusal(exc: BerthError) -> ScoringResult:
    """A request over one of the platform's limits (`berth.payload`): Databricks' error shape."""
    return ScoringResult(exc.http_status, orjson.dumps(exc.to_dict()), "application/json")


def _mlflow_error(exc: Exception) -> ScoringResult:
    return ScoringResult(
        exc.get_http_status_code(),  # type: ignore[attr-defined]
        exc.serialize_as_json().encode(),  # type: ignore[attr-defined]
        "application/json",
    )


def _internal_error(exc: Exception) -> ScoringResult:
    payload = {
        "error_code": "INTERNAL_ERROR",
        "message": f"{type(exc).__name__}: {exc}",
        "stack_trace": traceback.format_exc(),
    }
    return ScoringResult(500, orjson.dumps(payload), "application/json")
