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


# What one merged model call may take in: a batch's input stays under this many bytes.
BATCH_INPUT_BYTES = 64 * 1024 * 1024
# Bytes per value of MLflow's column types (strings and binaries: a typical size, not a bound).
_COLUMN_BYTES = {"boolean": 1, "integer": 4, "long": 8, "float": 4, "double": 8, "datetime": 8,
                 "string": 64, "binary": 1024}


def row_cap(schema: Any) -> int:
    """Rows one merged model call may take, from the model's input signature: as many as fit in
    `BATCH_INPUT_BYTES` (a 20-double row: ~420k rows; a 224×224×3 float32 image: 111)."""
    return max(1, BATCH_INPUT_BYTES // _row_bytes(schema))


def _row_bytes(schema: Any) -> int:
    if schema is None:
        return 1024  # no signature: assume a wide row
    if schema.is_tensor_spec():
        total = 0
        for spec in schema.inputs:
            shape = [abs(d) for d in spec.shape[1:]] if spec.shape else []
            total += int(np.prod(shape, dtype=np.int64)) * spec.type.itemsize if shape else spec.type.itemsize
        return max(1, total)
    return max(1, sum(_COLUMN_BYTES.get(str(getattr(s.type, "name", s.type)), 64) for s in schema.inputs))


def group_requests(items: Mapping[int, tuple[Any, Any]], max_rows: int | None = None) -> list[list[int]]:
    """Group request ids (in arrival order) by `batch_key`, each group at most `max_rows` rows (a
    request over the cap forms a group of its own); unbatchable requests stand alone."""
    groups: dict[Hashable, list[list[int]]] = {}
    rows: dict[Hashable, int] = {}
    alone: list[list[int]] = []
    for rid, (data, params) in items.items():
        key = batch_key(data, params)
        if key is None:
            alone.append([rid])
            continue
        n = len(data)
        chunks = groups.setdefault(key, [[]])
        if max_rows is not None and chunks[-1] and rows[key] + n > max_rows:
            chunks.append([])
            rows[key] = 0
        chunks[-1].append(rid)
        rows[key] = rows.get(key, 0) + n
    return [*(chunk for chunks in groups.values() for chunk in chunks), *alone]


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
