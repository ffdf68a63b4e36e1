"""The inference-table writer: rows reach a real Delta table (read back with deltalake),
the buffer is bounded, a stalled writer drops and counts instead of blocking, close() writes the rest."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson
import pytest
from deltalake import DeltaTable

from berth.errors import InvalidParameterValue
from berth.observability import inference
from berth.observability.inference import InferenceLog, client_request_id, parse_inference_table


def row(log: InferenceLog, uri: str, i: int, *, status: int = 200, request: bytes | None = None) -> None:
    body = request if request is not None else orjson.dumps({"inputs": [i], "client_request_id": f"c{i}"})
    log.record("ep", uri, status=status, request=body, response=b'{"predictions": [1]}', entity_id="e" * 32,
               requester="alice@example.com", execution_ms=3, received=time.time())


def test_rows_reach_the_table_with_the_payload_columns(tmp_path: Path):
    uri = str(tmp_path / "ep")
    written: list[int] = []
    log = InferenceLog(1 << 20, on_written=lambda endpoint, n: written.append(n))
    for i in range(25):
        row(log, uri, i, status=200 if i % 5 else 400)
    log.record("ep", uri, status=413, request=None, response=b"{}", entity_id=None, requester="bob",
               execution_ms=None, received=time.time())
    assert log.close()
    table = DeltaTable(uri).to_pyarrow_table()
    frame = table.to_pylist()
    assert len(frame) == 26 == sum(written) == log.written
    assert set(table.column_names) == {f.name for f in inference.schema()}
    assert len({r["databricks_request_id"] for r in frame}) == 26
    assert sum(1 for r in frame if r["status_code"] == 400) == 5
    served = sorted((r for r in frame if r["status_code"] != 413), key=lambda r: int(r["client_request_id"][1:]))
    assert [r["client_request_id"] for r in served[:2]] == ["c0", "c1"]
    assert orjson.loads(served[0]["request"])["inputs"] == [0]
    assert served[0]["response"] == '{"predictions": [1]}'
    assert {r["requester"] for r in served} == {"alice@example.com"}
    assert {r["execution_duration_ms"] for r in served} == {3}
    assert {r["sampling_fraction"] for r in served} == {1.0}
    (refused,) = [r for r in frame if r["status_code"] == 413]
    assert refused["request"] is None
    assert refused["logging_error_codes"] == ["MAX_REQUEST_SIZE_EXCEEDED"]
    assert str(table.schema.field("request_time").type) == "timestamp[us, tz=UTC]"
    assert refused["request_time"].date() == refused["request_date"]


def test_a_payload_over_the_limit_is_not_stored_and_the_row_says_why(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(inference, "MAX_PAYLOAD_BYTES", 100)
    uri = str(tmp_path / "ep")
    log = InferenceLog(1 << 20)
    row(log, uri, 0, request=b'{"inputs": "' + b"x" * 200 + b'"}')
    log.record("ep", uri, status=200, request=b"{}", response=b"y" * 200, entity_id=None, requester=None,
               execution_ms=1, received=time.time())
    log.record("ep", uri, status=204, request=b"[]", response=None, entity_id=None, requester=None,
               execution_ms=1, received=time.time())
    assert log.close()
    got, empty, big = sorted(DeltaTable(uri).to_pyarrow_table().to_pylist(), key=lambda r: r["request"] or "")
    assert got["request"] is None
    assert got["logging_error_codes"] == ["MAX_REQUEST_SIZE_EXCEEDED"]
    assert got["response"] == '{"predictions": [1]}'
    assert (big["request"], big["response"], big["logging_error_codes"]) == ("{}", None, ["MAX_RESPONSE_SIZE_EXCEEDED"])
    assert (empty["request"], empty["response"], empty["logging_error_codes"]) == ("[]", None, [])


def test_a_stalled_writer_drops_and_counts_past_the_bound_and_never_blocks_the_caller(tmp_path: Path):
    release = threading.Event()
    calls: list[int] = []

    def stalled(uri: str, table: object) -> None:
        calls.append(table.num_rows)  # type: ignore[attr-defined]
        release.wait(30)

    dropped: list[int] = []
    log = InferenceLog(20_000, write=stalled, on_dropped=lambda endpoint, n: dropped.append(n))
    row(log, "mem://ep", 0)
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:  # the first row is in the stalled write
        time.sleep(0.01)
    assert calls == [1]
    started = time.perf_counter()
    for i in range(1, 1001):
        row(log, "mem://ep", i)
    took = time.perf_counter() - started
    assert sum(dropped) == log.dropped > 0
    assert log.pending + log.dropped == 1000  # each row either waits in the bound or was counted as dropped
    assert took < 5  # never waited for the write (a generous bound: the writer is stalled for 30 s)
    release.set()
    assert log.close()
    assert sum(calls) == 1 + log.pending + (1000 - log.dropped)


def test_close_gives_up_on_a_store_that_never_answers():
    log = InferenceLog(1 << 20, write=lambda uri, table: threading.Event().wait(60))
    row(log, "mem://ep", 0)
    assert log.close(timeout_s=0.5) is False


def test_a_failed_write_keeps_its_rows_for_the_next_try(tmp_path: Path):
    uri = str(tmp_path / "ep")
    failures = [RuntimeError("store down")]

    def flaky(uri: str, table: object) -> None:
        if failures:
            raise failures.pop()
        inference._append(uri, table)  # type: ignore[arg-type]

    log = InferenceLog(1 << 20, write=flaky)
    for i in range(10):
        row(log, uri, i)
    assert log.close()
    assert DeltaTable(uri).to_pyarrow_table().num_rows == 10
    assert log.dropped == 0


def test_client_request_id_is_read_only_from_a_top_level_string():
    assert client_request_id(b'{"client_request_id": "abc", "inputs": [1]}') == "abc"
    assert client_request_id(b'{"inputs": [1]}') is None
    assert client_request_id(b'{"client_request_id": 5}') is None
    assert client_request_id(b'[{"client_request_id": "x"}]') is None
    assert client_request_id(b"client_request_id,a\n1,2") is None  # CSV


def test_the_config_is_validated():
    assert parse_inference_table(None, "x") is None
    cfg = parse_inference_table({"catalog_name": "main", "schema_name": "ml", "table_name_prefix": "clf",
                                 "enabled": True}, "x")
    assert cfg is not None
    assert cfg.table_name == "main.ml.clf_payload"
    assert cfg.to_dict() == {"catalog_name": "main", "schema_name": "ml", "table_name_prefix": "clf",
                             "enabled": True}
    off = parse_inference_table({"enabled": False}, "x")
    assert off is not None
    assert not off.enabled
    for bad in ([], {"enabled": "yes", "catalog_name": "a", "schema_name": "b"}, {"catalog_name": "a"},
                {"catalog_name": "a.b", "schema_name": "c"}, {"catalog_name": "a", "schema_name": "b", "x": 1}):
        with pytest.raises(InvalidParameterValue):
            parse_inference_table(bad, "x")


def test_a_payload_that_is_not_utf8_is_stored_with_replacement_characters(tmp_path: Path):
    uri = str(tmp_path / "ep")
    log = InferenceLog(1 << 20)
    row(log, uri, 0, request=b"\xff\xfeinputs")
    row(log, uri, 1)
    assert log.close()
    got = sorted(DeltaTable(uri).to_pyarrow_table().to_pylist(), key=lambda r: r["client_request_id"] or "")
    assert got[0]["request"] == "\ufffd\ufffdinputs"
    assert got[0]["client_request_id"] is None
    assert got[1]["client_request_id"] == "c1"
