"""The benchmark's models: the same MLflow model directories are served by every server.

- `lr`: a StandardScaler + LogisticRegression pipeline (3 classes);
- `rf`: a RandomForest with 100 trees of depth 8 (3 classes);

both on 20 float features, saved with `mlflow.sklearn.save_model` and a signature.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

N_FEATURES = 20
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
TRAIN_ROWS = 1000


def _training_data(seed: int) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(rng.normal(size=(TRAIN_ROWS, N_FEATURES)), columns=FEATURES)
    y = (x["f0"] + x["f1"] > 0).astype(int) + (x["f2"] > 1).astype(int)
    return x, y


def _save(model: Any, x: pd.DataFrame, path: Path, trusted_types: list[str] | None = None) -> Path:
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature

    example = x.head(3)
    signature = infer_signature(example, model.predict(example))
    # Pinned requirements spare MLflow inferring them in a subprocess (seconds per model); every
    # server here runs in this environment anyway (`--env-manager local`).
    requirements = [f"mlflow=={mlflow.__version__}", f"scikit-learn=={sklearn.__version__}"]
    mlflow.sklearn.save_model(
        model, str(path), signature=signature, input_example=example, pip_requirements=requirements,
        skops_trusted_types=trusted_types,
    )
    return path


def build_lr(path: Path, seed: int = 0) -> Path:
    """StandardScaler + LogisticRegression pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _training_data(seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    return _save(model, x, path)


def build_rf(path: Path, seed: int = 0) -> Path:
    """RandomForest, 100 trees, max depth 8 (predicts single-threaded: n_jobs=None)."""
    from sklearn.ensemble import RandomForestClassifier

    x, y = _training_data(seed)
    model = RandomForestClassifier(n_estimators=100, max_depth=8, random_state=seed).fit(x, y)
    # MLflow saves with skops, which asks us to vouch for the tree storage type of a model we built.
    return _save(model, x, path, trusted_types=["sklearn.tree._tree.Tree"])


BUILDERS: dict[str, Callable[[Path], Path]] = {"lr": build_lr, "rf": build_rf}


def request_body(seed: int = 1) -> bytes:
    """One-row `dataframe_split` JSON body (the same for every server and request)."""
    row = np.random.default_rng(seed).normal(size=N_FEATURES).round(6).tolist()
    return json.dumps({"dataframe_split": {"columns": FEATURES, "data": [row]}}).encode()
