"""A small demo model: scikit-learn logistic regression on iris, saved in MLflow format."""

from __future__ import annotations

from pathlib import Path


def make_demo_model(path: Path) -> Path:
    """Train and save the demo model (with signature and input example) at `path`."""
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    iris = load_iris(as_frame=True)
    X: pd.DataFrame = iris.data
    X.columns = [c.replace(" (cm)", "").replace(" ", "_") for c in X.columns]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, iris.target)
    example = X.head(2)
    mlflow.sklearn.save_model(
        model,
        str(path),
        signature=infer_signature(example, model.predict(example)),
        input_example=example,
    )
    return path
