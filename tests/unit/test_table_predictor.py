"""Which models take which shortcut from fast-parsed rows, and that every shortcut predicts exactly what
MLflow's full `PyFuncModel.predict` does (real MLflow models saved and loaded from disk)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from berth.runtimes.pyfunc import _json, table_predictor

COLS = ["a", "b", "c", "d"]


def _data(seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(rng.normal(size=(200, len(COLS))), columns=COLS)
    return x, (x["a"] + x["b"] > 0).astype(int) + (x["c"] > 1).astype(int)


def _sklearn(path: Path, model: Any, fit_columns: list[str] = COLS, **kwargs: Any) -> Path:
    x, y = _data()
    model.fit(x[fit_columns], y)
    example = x[COLS].head(3)
    # Pinned requirements spare MLflow inferring them in a subprocess (seconds per model).
    mlflow.sklearn.save_model(model, str(path), signature=infer_signature(example, model.predict(x[fit_columns])[:3]),
                              pip_requirements=["scikit-learn"], **kwargs)
    return path


def pipeline(path: Path) -> Path:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return _sklearn(path, make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)))


def forest_proba(path: Path) -> Path:
    from sklearn.ensemble import RandomForestClassifier

    return _sklearn(path, RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0),
                    pyfunc_predict_fn="predict_proba", skops_trusted_types=["sklearn.tree._tree.Tree"])


def column_transformer(path: Path) -> Path:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ct = ColumnTransformer([("scaled", StandardScaler(), ["d", "a"])], remainder="passthrough")
    return _sklearn(path, make_pipeline(ct, LogisticRegression(max_iter=300)))


def reordered(path: Path) -> Path:
    from sklearn.linear_model import LogisticRegression

    return _sklearn(path, LogisticRegression(max_iter=300), fit_columns=COLS[::-1])


class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return model_input * 2


def custom(path: Path) -> Path:
    mlflow.pyfunc.save_model(str(path), python_model=Doubler(), pip_requirements=["mlflow"],
                             signature=ModelSignature(inputs=Schema([ColSpec("double", c) for c in COLS])))
    return path


def with_params(path: Path) -> Path:
    signature = ModelSignature(inputs=Schema([ColSpec("double", c) for c in COLS]),
                               params=ParamSchema([ParamSpec("scale", "double", 1.0)]))
    mlflow.pyfunc.save_model(str(path), python_model=Doubler(), signature=signature, pip_requirements=["mlflow"])
    return path


CASES: dict[str, tuple[Callable[[Path], Path], str | None]] = {
    "pipeline": (pipeline, "array"),
    "forest_proba": (forest_proba, "array"),
    "column_transformer": (column_transformer, "frame"),  # selects columns by name: needs the frame
    "reordered": (reordered, "frame"),  # fitted in another column order: no array; the frame fails as MLflow's
    "custom": (custom, "frame"),
    "with_params": (with_params, None),  # default params: MLflow's path passes them
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("table-models")
    return {name: mlflow.pyfunc.load_model(str(build(root / name))) for name, (build, _) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_each_model_takes_the_expected_shortcut(loaded: dict[str, Any], name: str) -> None:
    predictor = table_predictor(loaded[name], tuple(COLS))
    assert (predictor.kind if predictor else None) == CASES[name][1]


@pytest.mark.parametrize("name", [n for n, (_, kind) in CASES.items() if kind and n != "reordered"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=arrays(np.float64, st.tuples(st.integers(1, 20), st.just(len(COLS))),
                     elements=st.floats(-1e6, 1e6, allow_nan=False)))
def test_shortcuts_predict_exactly_what_mlflow_predicts(loaded: dict[str, Any], name: str, values: np.ndarray) -> None:
    model = loaded[name]
    predictor = table_predictor(model, tuple(COLS))
    assert predictor is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = predictor.predict(values)
        theirs = model.predict(pd.DataFrame(values, columns=COLS))
    assert _json(ours) == _json(theirs)


def test_a_frame_the_model_refuses_fails_as_it_does_on_mlflows_path(loaded: dict[str, Any]) -> None:
    model = loaded["reordered"]
    predictor = table_predictor(model, tuple(COLS))
    assert predictor is not None
    values = np.zeros((2, len(COLS)))
    with pytest.raises(ValueError, match="feature names"):
        predictor.predict(values)
    with pytest.raises(Exception, match="feature names"):
        model.predict(pd.DataFrame(values, columns=COLS))


class Counting(mlflow.pyfunc.PythonModel):
    calls = 0

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        type(self).calls += 1
        return model_input


def test_user_code_never_runs_at_load(tmp_path: Path) -> None:
    # A model's predict may have side effects (a paid API, a crash): only scikit-learn runs on the probe.
    mlflow.pyfunc.save_model(str(tmp_path / "m"), python_model=Counting(), pip_requirements=["mlflow"],
                             signature=ModelSignature(inputs=Schema([ColSpec("double", c) for c in COLS])))
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    impl = model.unwrap_python_model()
    before = type(impl).calls
    predictor = table_predictor(model, tuple(COLS))
    assert predictor is not None
    assert predictor.kind == "frame"
    assert type(impl).calls == before
