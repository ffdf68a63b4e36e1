"""Adaptive micro-batching, the pure part: which parsed requests can share one model call, how
their inputs merge, and how the predictions split back.

Requests merge only when the merge cannot change what the model sees for each row: the same
kind of input (fast-parsed rows of the same columns, a DataFrame with the same columns and
dtypes and a default index, or an array of the same dtype and trailing shape) and the same params.
Predictions split back only when they are row-aligned with the merged input (a DataFrame, Series,
array or list as long as it).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import orjson
import pandas as pd

from berth.replica.fastpath import Table

UNBATCHABLE = object()  # pass as params to keep a request out of every batch


def batch_key(data: Any, params: Any) -> Hashable | None:
    """The key of requests that may share a model call, or None when this one must run alone."""
    if params is UNBATCHABLE:
        return None
    try:
        params_key = orjson.dumps(params, option=orjson.OPT_SORT_KEYS) if params else b""
    except TypeError:
        return None
    if isinstance(data, Table):
        return ("table", data.columns, params_key)
    if isinstance(data, pd.DataFrame):
        index = data.index
        if not (isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1):
            return None
        dtypes = tuple(str(t) for t in data.dtypes)
        if any(t == "category" for t in dtypes) or not data.columns.is_unique:
            return None
        return ("df", tuple(data.columns), dtypes, params_key)
    if isinstance(data, np.ndarray) and data.ndim >= 1 and data.dtype != object:
        return ("nd", data.dtype.str, data.shape[1:], params_key)
    return None


def group_requests(items: Mapping[int, tuple[Any, Any]]) -> list[list[int]]:
    """Group request ids (in arrival order) by `batch_key`; unbatchable requests stand alone."""
    groups: dict[Hashable, list[int]] = {}
    alone: list[list[int]] = []
    for rid, (data, params) in items.items():
        key = batch_key(data, params)
        if key is None:
            alone.append([rid])
        else:
            groups.setdefault(key, []).append(rid)
    return [*groups.values(), *alone]


def merge(inputs: list[Any]) -> tuple[Any, list[int]]:
    """One input made of all rows, and each request's row count."""
    counts = [len(x) for x in inputs]
    if isinstance(inputs[0], Table):
        return Table(inputs[0].columns, np.concatenate([x.values for x in inputs], axis=0)), counts
    if isinstance(inputs[0], pd.DataFrame):
        return pd.concat(inputs, ignore_index=True), counts
    return np.concatenate(inputs, axis=0), counts


def split(predictions: Any, counts: list[int]) -> list[Any] | None:
    """Each request's share of row-aligned predictions, or None if they are not row-aligned."""
    total = sum(counts)
    if isinstance(predictions, pd.DataFrame | pd.Series):
        if len(predictions) != total:
            return None
        take = predictions.iloc.__getitem__
    elif isinstance(predictions, np.ndarray):
        if predictions.ndim == 0 or len(predictions) != total:
            return None
        take = predictions.__getitem__
    elif isinstance(predictions, list):
        if len(predictions) != total:
            return None
        take = predictions.__getitem__
    else:
        return None
    parts = []
    start = 0
    for n in counts:
        parts.append(take(slice(start, start + n)))
        start += n
    return parts
