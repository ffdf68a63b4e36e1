"""Lean parsing for the common case: a JSON request to a model whose signature is all `double`
columns. orjson parses the body straight into one float64 array (no per-request DataFrame);
anything unusual returns None and takes MLflow's own parser, so errors stay MLflow's.

The array becomes a DataFrame with the schema's columns, in the schema's order, once per model
call: the same frame MLflow's parsing and schema enforcement would have built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd

# Keys Databricks clients may send beside the input; they are not model input.
IGNORED_KEYS = frozenset({"client_request_id", "usage_context"})
_EXACT_INT = 2**53  # larger ints do not survive float64 exactly


@dataclass(frozen=True)
class Table:
    """Rows of a column-signature input: column names and a 2-D float64 array."""

    columns: tuple[str, ...]
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.values, columns=list(self.columns), copy=False)


class NumericParser:
    """Parses requests for an all-double column signature; None means "use MLflow's parser"."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = tuple(columns)
        self._names = frozenset(columns)

    @classmethod
    def for_schema(cls, schema: Any) -> NumericParser | None:
        """A parser when every input is a required `double` column, else None."""
        if schema is None or schema.is_tensor_spec() or not schema.has_input_names():
            return None
        from mlflow.types import DataType

        specs = schema.inputs
        if not specs or any(s.type != DataType.double or not s.required for s in specs):
            return None
        names = [s.name for s in specs]
        return cls(names) if len(set(names)) == len(names) else None

    def parse(self, body: bytes) -> Table | None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return self.parse_obj(obj)

    def parse_obj(self, obj: Any) -> Table | None:
        """`parse` of a body orjson already parsed. A table it returns nests at most 4 deep
        (`berth.payload.FAST_PATH_DEPTH`): the body needs no depth check."""
        if not isinstance(obj, dict):
            return None
        keys = [k for k in obj if k not in IGNORED_KEYS]
        if len(keys) != 1:
            return None  # params, several inputs or none: MLflow's path
        key = keys[0]
        payload = obj[key]
        if key == "dataframe_split":
            rows = self._split_rows(payload)
        elif key in ("dataframe_records", "instances"):
            rows = self._record_rows(payload)
        elif key == "inputs":
            rows = self._columnar_rows(payload)
        else:
            return None
        if rows is None:
            return None
        values = _float_matrix(rows, len(self.columns))
        return None if values is None else Table(self.columns, values)

    def _split_rows(self, payload: Any) -> list[list[Any]] | None:
        if not isinstance(payload, dict) or payload.keys() != {"columns", "data"}:
            return None  # an index, or missing columns: MLflow's path
        columns, data = payload["columns"], payload["data"]
        if not isinstance(columns, list) or not isinstance(data, list) or not data:
            return None
        if len(columns) != len(self.columns) or not all(type(c) is str for c in columns):
            return None  # (a list as a column name is unhashable: MLflow's path answers it)
        if set(columns) != self._names:
            return None
        if tuple(columns) == self.columns:
            return data
        order = [columns.index(c) for c in self.columns]
        if not all(isinstance(row, list) and len(row) == len(order) for row in data):
            return None
        return [[row[i] for i in order] for row in data]

    def _record_rows(self, payload: Any) -> list[list[Any]] | None:
        if not isinstance(payload, list) or not payload:
            return None
        rows = []
        for record in payload:
            if not isinstance(record, dict) or record.keys() != self._names:
                return None
            rows.append([record[c] for c in self.columns])
        return rows

    def _columnar_rows(self, payload: Any) -> list[list[Any]] | None:
        if not isinstance(payload, dict) or payload.keys() != self._names:
            return None
        cols = [payload[c] for c in self.columns]
        if not all(isinstance(c, list) for c in cols):
            return None
        n = len(cols[0])
        if n == 0 or any(len(c) != n for c in cols):
            return None
        return [list(row) for row in zip(*cols, strict=True)]


def _float_matrix(rows: list[Any], width: int) -> np.ndarray | None:
    """Rows of plain ints and floats as an (n, width) float64 array; None for anything else."""
    for row in rows:
        if not isinstance(row, list) or len(row) != width:
            return None
        for v in row:
            t = type(v)
            if t is float:
                continue
            if t is not int or not -_EXACT_INT <= v <= _EXACT_INT:  # bool, None, str, huge: MLflow decides
                return None
    try:
        values = np.array(rows, dtype=np.float64)
    except (OverflowError, ValueError):
        return None
    if not np.isfinite(values).all():
        return None
    return values
