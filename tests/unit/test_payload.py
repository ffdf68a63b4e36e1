"""Limits on input (`berth.payload`, `berth.http.read_body`): bodies, headers, JSON depth, rows."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.errors import HeadersTooLarge, PayloadTooLarge
from berth.http import Message, limit_body, read_body
from berth.payload import (
    ORJSON_MAX_DEPTH,
    PayloadLimits,
    check_head,
    is_depth_error,
    rows_in,
    too_deep,
)
from berth.replica.launch import ReplicaArgs
from berth.settings import Settings


class Chunks:
    """An ASGI `receive` over body chunks, counting how many it handed out."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.calls = 0

    async def __call__(self) -> Message:
        self.calls += 1
        body = self.chunks.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(self.chunks)}


def read(receive: Chunks, limit: int | None = None, content_length: bytes | None = None) -> bytes:
    return asyncio.run(read_body(receive, limit, content_length))


# read_body
def test_read_body_without_a_limit_joins_every_chunk():
    assert read(Chunks(b"ab", b"", b"cd")) == b"abcd"
    assert read(Chunks(b"")) == b""


@pytest.mark.parametrize("chunks", [(b"x" * 10,), (b"xxx", b"xxxx", b"xxx"), (b"", b"x" * 10, b"")])
def test_a_body_of_exactly_the_limit_is_read(chunks):
    assert read(Chunks(*chunks), limit=10, content_length=b"10") == b"x" * 10


def test_one_chunk_over_the_limit_is_refused():
    with pytest.raises(PayloadTooLarge) as caught:
        read(Chunks(b"x" * 11), limit=10)
    assert caught.value.http_status == 413
    assert caught.value.to_dict()["error_code"] == "PAYLOAD_TOO_LARGE"
    assert "10 bytes" in caught.value.message
    assert "BERTH_MAX_BODY_MB" in caught.value.message


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit():
    receive = Chunks(b"x" * 4, b"x" * 4, b"x" * 4, b"x" * 4, b"x" * 4)
    with pytest.raises(PayloadTooLarge):
        read(receive, limit=10)
    assert receive.calls == 3  # the third chunk passed 10 bytes: the last two were never read
    assert len(receive.chunks) == 2


def test_a_content_length_over_the_limit_is_refused_before_anything_is_read():
    receive = Chunks(b"x")
    with pytest.raises(PayloadTooLarge):
        read(receive, limit=10, content_length=b"11")
    assert receive.calls == 0


def test_limit_body_passes_messages_through_until_the_limit():
    async def run(limit: int, *chunks: bytes) -> list[Message]:
        receive = limit_body(Chunks(*chunks), limit)
        return [await receive() for _ in chunks]

    assert [m["body"] for m in asyncio.run(run(6, b"abc", b"def"))] == [b"abc", b"def"]
    with pytest.raises(PayloadTooLarge):
        asyncio.run(run(5, b"abc", b"def"))

    async def disconnect() -> Message:
        return {"type": "http.disconnect"}

    assert asyncio.run(limit_body(disconnect, 0)())["type"] == "http.disconnect"


# Headers
LIMITS = PayloadLimits(max_body_bytes=100, max_header_bytes=60, max_header_field_bytes=30)


def test_headers_within_the_limits_pass():
    assert check_head([(b"host", b"x"), (b"content-length", b"100")], LIMITS) is None
    assert check_head([(b"a" * 10, b"b" * 20), (b"c" * 10, b"d" * 20)], LIMITS) is None  # 30 each, 60 together


def test_one_header_over_its_limit_is_refused_with_431():
    refused = check_head([(b"x-big", b"v" * 26)], LIMITS)
    assert isinstance(refused, HeadersTooLarge)
    assert refused.http_status == 431
    assert refused.error_code == "REQUEST_HEADER_FIELDS_TOO_LARGE"
    assert "'x-big'" in refused.message
    assert "BERTH_MAX_HEADER_FIELD_KB" in refused.message


def test_headers_over_the_limit_together_are_refused_with_431():
    refused = check_head([(b"x-a", b"v" * 25), (b"x-b", b"v" * 25), (b"x-c", b"vv")], LIMITS)  # 61 bytes
    assert isinstance(refused, HeadersTooLarge)
    assert "BERTH_MAX_HEADER_KB" in refused.message


def test_a_content_length_over_the_body_limit_is_refused_with_413():
    refused = check_head([(b"content-length", b"101")], LIMITS)
    assert isinstance(refused, PayloadTooLarge)


# JSON depth
def depth(obj: Any) -> int:
    """The reference: nested arrays and objects, recursively."""
    if isinstance(obj, dict):
        return 1 + max((depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((depth(v) for v in obj), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=60, deadline=None)
@given(json_values, st.integers(min_value=0, max_value=12))
def test_too_deep_agrees_with_the_recursive_depth(value, limit):
    assert too_deep(value, limit) == (depth(value) > limit)


def test_too_deep_at_the_boundary_and_far_past_any_recursion_limit():
    assert not too_deep(orjson.loads(b"[" * 64 + b"]" * 64), 64)
    assert too_deep(orjson.loads(b"[" * 65 + b"]" * 65), 64)
    assert not too_deep({"inputs": [[1, 2]]}, 3)
    assert too_deep({"inputs": [[1, 2]]}, 2)
    deep: list[Any] = []
    for _ in range(100_000):  # deeper than Python's recursion limit: the walk is iterative
        deep = [deep]
    assert too_deep(deep, 1024)


def test_orjson_refuses_past_1024_levels_and_we_recognise_its_error():
    assert orjson.loads(b"[" * ORJSON_MAX_DEPTH + b"]" * ORJSON_MAX_DEPTH)
    with pytest.raises(orjson.JSONDecodeError) as caught:
        orjson.loads(b"[" * (ORJSON_MAX_DEPTH + 1) + b"]" * (ORJSON_MAX_DEPTH + 1))
    assert is_depth_error(caught.value)
    with pytest.raises(orjson.JSONDecodeError) as other:
        orjson.loads(b"[1,")
    assert not is_depth_error(other.value)


# Rows
@pytest.mark.parametrize(
    ("body", "rows"),
    [
        ({"dataframe_split": {"columns": ["a"], "data": [[1], [2], [3]]}}, 3),
        ({"dataframe_records": [{"a": 1}, {"a": 2}]}, 2),
        ({"instances": [[1, 2], [3, 4], [5, 6], [7, 8]]}, 4),
        ({"inputs": [1, 2, 3, 4, 5]}, 5),
        ({"inputs": {"a": [1, 2], "b": [1, 2, 3]}}, 3),  # columnar: the longest column
        ({"inputs": {"a": 1}}, 1),
        ({"inputs": "a prompt"}, 1),
        ({"messages": [{"role": "user"}] * 7}, 0),  # not rows
        ({"dataframe_split": "nonsense"}, 0),
        ([1, 2, 3], 0),
    ],
)
def test_rows_of_each_input_format(body, rows):
    assert rows_in(body) == rows


# Settings
def test_the_limits_come_from_settings_and_their_defaults_agree():
    assert PayloadLimits.from_settings(Settings()) == PayloadLimits()
    env = {"BERTH_MAX_BODY_MB": "0.5", "BERTH_MAX_HEADER_KB": "8", "BERTH_MAX_HEADER_FIELD_KB": "1",
           "BERTH_MAX_JSON_DEPTH": "10", "BERTH_MAX_ROWS": "7"}
    limits = PayloadLimits.from_settings(Settings.from_env(env))
    assert limits == PayloadLimits(max_body_bytes=2**19, max_header_bytes=8192, max_header_field_bytes=1024,
                                   max_json_depth=10, max_rows=7)
    assert PayloadLimits.from_json(json.loads(json.dumps(limits.to_json()))) == limits


@pytest.mark.parametrize("bad", [{"max_rows": 0}, {"max_body_bytes": 0}, {"max_json_depth": 3},
                                 {"max_json_depth": ORJSON_MAX_DEPTH + 1}])
def test_limits_out_of_range_are_refused_at_start(bad):
    with pytest.raises(ValueError, match="must be"):
        PayloadLimits(**bad)


def test_replica_args_carry_the_replica_limits():
    args = ReplicaArgs("r1", "m", "/tmp/s.sock", 4, "file:///m", max_rows=5, max_json_depth=9)
    again = ReplicaArgs.from_json(orjson.loads(orjson.dumps(args.to_json())))
    assert again == args
    assert again.limits == PayloadLimits(max_rows=5, max_json_depth=9)
    old = {k: v for k, v in args.to_json().items() if k not in ("max_rows", "max_json_depth")}
    assert ReplicaArgs.from_json(old).limits == PayloadLimits()  # an order from before the limits
