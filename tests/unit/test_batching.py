"""The pure part of micro-batching: which requests share a call, the row cap from the signature, and
that merge + split gives every request exactly its own rows back."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given
from hypothesis import strategies as st
from mlflow.types import ColSpec, Schema, TensorSpec

from berth.replica.batching import BATCH_INPUT_BYTES, UNBATCHABLE, group_requests, merge, row_cap, split
from berth.replica.fastpath import Table

COLS = ("a", "b")


def table(rows: int) -> Table:
    return Table(COLS, np.arange(rows * 2, dtype=np.float64).reshape(rows, 2))


def test_row_cap_comes_from_the_signature() -> None:
    doubles = Schema([ColSpec("double", f"f{i}") for i in range(20)])
    assert row_cap(doubles) == BATCH_INPUT_BYTES // (20 * 8)
    images = Schema([TensorSpec(np.dtype("float32"), (-1, 224, 224, 3))])
    assert row_cap(images) == BATCH_INPUT_BYTES // (224 * 224 * 3 * 4)
    assert row_cap(Schema([TensorSpec(np.dtype("float32"), (-1, 1 << 26))])) == 1  # wider than the budget
    assert row_cap(None) >= 1


def test_same_kind_groups_and_unbatchable_requests_stand_alone() -> None:
    frame = pd.DataFrame({"a": [1.0], "b": [2.0]})
    items = {0: (table(1), None), 1: (frame, None), 2: (table(2), None), 3: (table(1), UNBATCHABLE),
             4: (table(1), {"k": 1}), 5: (frame.set_axis([7]), None), 6: (table(1), {"k": 1})}
    groups = group_requests(items)
    assert sorted(groups) == sorted([[0, 2], [1], [4, 6], [3], [5]])  # [5]: a non-default index


@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=40), cap=st.integers(1, 120))
def test_groups_keep_arrival_order_and_the_row_cap(sizes: list[int], cap: int) -> None:
    items = {i: (table(n), None) for i, n in enumerate(sizes)}
    groups = group_requests(items, cap)
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    for group in groups:
        assert len(group) == 1 or sum(sizes[i] for i in group) <= cap


@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=20))
def test_merge_then_split_returns_each_requests_rows(sizes: list[int]) -> None:
    inputs = [table(n) for n in sizes]
    merged, counts = merge(inputs)
    assert counts == sizes
    parts = split(merged.values[:, 0] * 10, counts)  # a row-aligned prediction per row
    assert parts is not None
    for part, original in zip(parts, inputs, strict=True):
        assert np.array_equal(part, original.values[:, 0] * 10)
    frames = [pd.DataFrame(t.values, columns=list(COLS)) for t in inputs]
    merged_frame, _ = merge(frames)
    frame_parts = split(merged_frame, counts)
    assert frame_parts is not None
    assert all(len(p) == n for p, n in zip(frame_parts, sizes, strict=True))


def test_predictions_that_are_not_row_aligned_do_not_split() -> None:
    assert split(np.array([1.0, 2.0]), [2, 1]) is None
    assert split({"x": 1}, [1]) is None
    assert split(np.float64(3.0), [1]) is None
