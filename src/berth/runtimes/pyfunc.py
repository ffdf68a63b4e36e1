"""The short way from fast-parsed rows to a pyfunc model's predictions.

MLflow's `PyFuncModel.predict` enforces the input schema on every call (copying and converting the
frame) before it calls the flavor's predict function. Rows from the numeric fast path
(`berth.replica.fastpath`) already are what enforcement produces: every schema column, as float64,
in the schema's order. So for them the replica may call the flavor's predict function itself:

- `frame`: the flavor's function on the DataFrame (any flavor whose predictions do not depend on
  MLflow's prediction context, params or type hints);
- `array`: for a scikit-learn model whose estimators are all scikit-learn's own and need no column
  names (no ColumnTransformer, no FunctionTransformer), the estimator on the float64 array itself,
  so pandas is not touched at all.

The frame shortcut is equivalent by construction. The array shortcut is taken only if, at load, it
answers a probe input (the model's input example, else random rows) with exactly the JSON that
MLflow's full path produces; only scikit-learn's own estimators run on the probe, never user code,
which may have side effects. A call that raises on the short way is redone on MLflow's (the caller
does that), so errors stay MLflow's.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import StringIO
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("berth.replica")

# Estimators that select or transform columns by name, or run user code on the frame.
_NEEDS_FRAME = frozenset({"ColumnTransformer", "FunctionTransformer", "make_column_selector"})
# scikit-learn warns on every call that an estimator fitted on a frame got an array; we checked the
# columns ourselves (same names, same order), so the warning says nothing here.
_FEATURE_NAMES_WARNING = "X does not have valid feature names"


@dataclass(frozen=True)
class TablePredictor:
    """Predicts on an (n, columns) float64 array of schema-ordered rows; `kind` is "array" or "frame"."""

    kind: str
    predict: Callable[[np.ndarray], Any]


def table_predictor(model: Any, columns: tuple[str, ...]) -> TablePredictor | None:
    """The shortest safe predictor for fast-parsed rows of `model` (a loaded `PyFuncModel`), or None."""
    meta = model.metadata
    if meta.get_params_schema() is not None or meta._is_signature_from_type_hint() \
            or meta._is_type_hint_from_example() or getattr(model, "model_id", None):
        return None
    from mlflow.models.dependencies_schemas import _get_dependencies_schema_from_model

    if _get_dependencies_schema_from_model(meta):
        return None
    predict_fn = getattr(model, "_predict_fn", None)
    if predict_fn is None:
        return None
    names = list(columns)

    def on_frame(values: np.ndarray) -> Any:
        return predict_fn(pd.DataFrame(values, columns=names))

    frame = TablePredictor("frame", on_frame)
    array_fn = _sklearn_array_fn(model, predict_fn, names)
    if array_fn is None:
        return frame
    probe = _probe(model, names)
    try:
        expected = _json(model.predict(pd.DataFrame(probe, columns=names)))
        same = _json(array_fn(probe)) == expected
    except Exception:
        same = False  # the model refuses the probe: nothing to compare the array path against
    if same:
        return TablePredictor("array", array_fn)
    log.info("scikit-learn on the array answers the probe differently from MLflow: the frame is used")
    return frame


def _sklearn_array_fn(model: Any, predict_fn: Any, names: list[str]) -> Callable[[np.ndarray], Any] | None:
    if model.metadata.flavors.get("python_function", {}).get("loader_module") != "mlflow.sklearn":
        return None
    estimator = getattr(model._model_impl, "sklearn_model", None)
    if estimator is None:
        return None
    fn = estimator.predict if getattr(predict_fn, "__func__", None) is type(model._model_impl).predict else predict_fn
    if getattr(fn, "__self__", None) is not estimator:
        return None
    fitted = getattr(estimator, "feature_names_in_", None)
    if fitted is not None and list(fitted) != names:
        return None
    for part in _estimators(estimator):
        named = part if callable(part) and not hasattr(part, "get_params") else type(part)
        if not str(getattr(named, "__module__", "")).startswith("sklearn.") or named.__name__ in _NEEDS_FRAME:
            return None
    if fitted is not None:
        warnings.filterwarnings("ignore", message=_FEATURE_NAMES_WARNING, category=UserWarning)
    import sklearn

    def predict(values: np.ndarray) -> Any:
        with sklearn.config_context(assume_finite=True):  # the fast path admits finite values only
            return fn(values)

    return predict


def _estimators(root: Any) -> Iterator[Any]:
    """`root` and every estimator or callable reachable through its parameters."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, list | tuple):
            stack.extend(item)
            continue
        get_params = getattr(item, "get_params", None)
        if get_params is None:
            if callable(item) and not isinstance(item, type):
                yield item  # a function as a parameter: user code
            continue
        yield item
        try:
            params = get_params(deep=False)
        except Exception:
            yield object()  # cannot inspect it: refuse (object is not from sklearn)
            continue
        stack.extend(v for v in params.values() if not isinstance(v, str | int | float | bool | type(None)))


def _probe(model: Any, names: list[str]) -> np.ndarray:
    """Rows to compare the paths on: the model's input example when it has one, else random rows."""
    try:
        example = model.input_example
    except Exception:
        example = None
    if isinstance(example, pd.DataFrame) and set(example.columns) == set(names):
        try:
            return example[names].to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            pass
    return np.random.default_rng(0).normal(size=(3, len(names)))


def _json(predictions: Any) -> str:
    from mlflow.pyfunc.scoring_server import predictions_to_json

    out = StringIO()
    predictions_to_json(predictions, out)
    return out.getvalue()
