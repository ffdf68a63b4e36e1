"""Inference tables: every request of an endpoint that has one, errors included, as a row of a Delta table.

The config is Databricks' (`ai_gateway.inference_table_config`, or the legacy
`config.auto_capture_config`): `{catalog_name, schema_name, table_name_prefix, enabled}`. The table
has the AI-gateway payload table's columns (`schema()`) and lives at `<root>/<endpoint>`, where the
root is `BERTH_INFERENCE_TABLES_URI` (a path or any URI deltalake writes: `s3://…`, `gs://…`,
`az://…`, configured through the object store's usual environment variables), by default
`DATA_DIR/inference`.

Each gateway process logs its own requests. `InferenceLog.record` is what the hot path pays: it
appends a tuple to a list under a lock. A daemon thread takes the list every `FLUSH_S` (sooner when
it holds `FLUSH_ROWS`) and appends it to the table with `deltalake` as one commit (concurrent appends from several
processes are Delta commits; delta-rs retries them). The buffer is bounded in bytes: past the bound
a row is dropped and counted (`berth_inference_rows_dropped_total`), the request itself is never
slowed; a failed write keeps its rows for the next try while they fit. `close()` writes what is left
(a clean shutdown loses nothing) and gives up after `CLOSE_TIMEOUT_S` on a stalled store.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from berth.errors import InvalidParameterValue

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("berth.inference")

FLUSH_S = 5.0  # rows reach the table within about this long (fewer, larger commits: cheaper, fewer files)
FLUSH_ROWS = 5_000  # or sooner, once this many wait
MAX_TRIES = 3  # writes of one batch before its rows are dropped (and counted)
CLOSE_TIMEOUT_S = 5.0  # a clean shutdown waits this long for the last write to a stalled store
# A request or response over this is not stored (NULL) and the row says so in `logging_error_codes`.
MAX_PAYLOAD_BYTES = 1 << 20



@cache
def schema() -> pa.Schema:
    """The AI-gateway payload table's columns (pyarrow is imported by the writer only)."""
    import pyarrow as pa

    return pa.schema([
        ("databricks_request_id", pa.string()),
        ("client_request_id", pa.string()),
        ("request_date", pa.date32()),
        ("request_time", pa.timestamp("us", tz="UTC")),
        ("status_code", pa.int32()),
        ("sampling_fraction", pa.float64()),
        ("execution_duration_ms", pa.int64()),
        ("request", pa.string()),
        ("response", pa.string()),
        ("served_entity_id", pa.string()),
        ("requester", pa.string()),
        ("logging_error_codes", pa.list_(pa.string())),
    ])


_FIELDS = ("catalog_name", "schema_name", "table_name_prefix")
TOO_LARGE = b"\x00berth: response over the size limit"  # by identity: a response that was not kept


@dataclass(frozen=True)
class InferenceTableConfig:
    """Databricks' `InferenceTableConfig` / `AutoCaptureConfigInput`."""

    catalog_name: str = ""
    schema_name: str = ""
    table_name_prefix: str = ""
    enabled: bool = False

    @property
    def table_name(self) -> str:
        """`<catalog>.<schema>.<prefix>_payload`, Databricks' name for the payload table."""
        return f"{self.catalog_name}.{self.schema_name}.{self.table_name_prefix}_payload"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _FIELDS if getattr(self, k)}
        out["enabled"] = self.enabled
        return out


def parse_inference_table(raw: Any, where: str) -> InferenceTableConfig | None:
    """`where` names the field in errors (`ai_gateway.inference_table_config`, `auto_capture_config`)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidParameterValue(f"'{where}' must be an object.")
    unknown = set(raw) - {*_FIELDS, "enabled", "state"}  # `state` comes back from GET: accepted, ignored
    if unknown:
        raise InvalidParameterValue(f"{where} has unknown field(s): {', '.join(sorted(unknown))}.")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise InvalidParameterValue(f"{where}.enabled must be a boolean.")
    values = {}
    for name in _FIELDS:
        value = raw.get(name, "")
        if not isinstance(value, str) or len(value) > 255 or any(c in value for c in "./ `"):
            raise InvalidParameterValue(f"{where}.{name} must be a name of at most 255 characters without "
                                        f"'.', '/', '`' or spaces; got {value!r}.")
        values[name] = value
    if enabled and not (values["catalog_name"] and values["schema_name"]):
        raise InvalidParameterValue(f"{where} needs catalog_name and schema_name when enabled.")
    return InferenceTableConfig(**values, enabled=enabled)


def table_uri(root: str, endpoint: str) -> str:
    return f"{root.rstrip('/')}/{endpoint}"


def client_request_id(body: bytes) -> str | None:
    """The body's top-level `client_request_id` (Databricks' field), if it is a string."""
    if b"client_request_id" not in body:  # the common case costs a byte scan, not a parse
        return None
    import orjson

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = doc.get("client_request_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


Row = tuple[Any, ...]


class InferenceLog:
    """One process's buffered writer of inference-table rows, one table per endpoint."""

    def __init__(self, max_bytes: int, *, on_written: Callable[[str, int], None] | None = None,
                 on_dropped: Callable[[str, int], None] | None = None,
                 write: Callable[[str, pa.Table], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.on_written = on_written or (lambda endpoint, n: None)
        self.on_dropped = on_dropped or (lambda endpoint, n: None)
        self._write = write or _append
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._rows: dict[tuple[str, str], list[Row]] = {}  # (endpoint, table URI) -> rows
        self._count = 0
        self._bytes = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0
        self._failures: dict[str, int] = {}  # table URI -> writes in a row that failed (the writer's own)

    def record(self, endpoint: str, uri: str, *, status: int, request: bytes | None, response: bytes | None,
               entity_id: str | None, requester: str | None, execution_ms: int | None,
               received: float, request_id: str | None = None) -> None:
        """Queue one request's row (what the hot path calls, after its answer is written). `request`
        None: the body was refused unread for its size. Only a tuple is made here: decoding, ids and
        the columns are the writer thread's work. A payload over `MAX_PAYLOAD_BYTES` is not kept at all."""
        if request is not None and len(request) > MAX_PAYLOAD_BYTES:
            request = None
        if response is not None and len(response) > MAX_PAYLOAD_BYTES:
            response = TOO_LARGE
        row = (request_id, received, status, execution_ms, request, response, entity_id, requester)
        size = _size(row)
        with self._lock:
            if self._bytes + size > self.max_bytes:
                self.dropped += 1
                dropped = True
            else:
                dropped = False
                self._rows.setdefault((endpoint, uri), []).append(row)
                self._count += 1
                self._bytes += size
                if self._thread is None or not self._thread.is_alive():  # the first row, or the writer died
                    self._thread = threading.Thread(target=self._run, name="berth-inference", daemon=True)
                    self._thread.start()
                elif self._count >= FLUSH_ROWS:
                    self._wake.notify()
        if dropped:
            self.on_dropped(endpoint, 1)

    @property
    def pending(self) -> int:
        return self._count

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._closing and self._count < FLUSH_ROWS:
                    self._wake.wait(FLUSH_S)
                batches, self._rows = self._rows, {}
                self._count = self._bytes = 0
                closing = self._closing
            for (endpoint, uri), rows in batches.items():
                self._flush(endpoint, uri, rows)
            if closing:
                with self._lock:
                    if not self._rows:
                        self._wake.notify_all()  # tell close() it is done
                        return

    def _flush(self, endpoint: str, uri: str, rows: list[Row]) -> None:
        try:
            self._write(uri, to_table(rows))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # deltalake's Rust panics arrive as BaseException: the writer lives on
            failures = self._failures[uri] = self._failures.get(uri, 0) + 1
            if failures >= MAX_TRIES:  # a table that keeps failing must not hold the buffer from the others
                log.error("inference table %s: %d write(s) in a row failed; dropping %d row(s): %r", uri,
                          failures, len(rows), exc, extra={"endpoint": endpoint, "table": uri, "rows": len(rows)})
                self._failures[uri] = 0
                self._drop(endpoint, len(rows))
            else:
                log.warning("inference table %s: writing %d row(s) failed, will retry: %r", uri, len(rows), exc,
                            extra={"endpoint": endpoint, "table": uri, "rows": len(rows)})
                self._requeue(endpoint, uri, rows)
            time.sleep(min(FLUSH_S, 1.0))
            return
        self._failures[uri] = 0
        self.written += len(rows)
        self.on_written(endpoint, len(rows))

    def _drop(self, endpoint: str, count: int) -> None:
        with self._lock:
            self.dropped += count
        self.on_dropped(endpoint, count)

    def _requeue(self, endpoint: str, uri: str, rows: list[Row]) -> None:
        """Put a failed batch back in front, as far as the bound allows; the rest is dropped and counted.
        (While closing, the writer keeps trying until `close` stops waiting for it.)"""
        with self._lock:
            kept: list[Row] = []
            room = self.max_bytes - self._bytes
            for row in rows:
                size = _size(row)
                if size > room:
                    break
                kept.append(row)
                room -= size
                self._bytes += size
            if kept:
                self._rows[(endpoint, uri)] = kept + self._rows.get((endpoint, uri), [])
            self._count += len(kept)
        if len(rows) > len(kept):
            self._drop(endpoint, len(rows) - len(kept))

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Write what is buffered; False if the store did not take it within `timeout_s`."""
        with self._lock:
            self._closing = True
            thread = self._thread
            if thread is None:
                return True
            self._wake.notify_all()
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("inference tables: the last write did not finish within %g s; %d row(s) not written",
                        timeout_s, self._count)
            return False
        return True


def _size(row: Row) -> int:
    """What a row is counted as against the buffer's bound: its payloads and a fixed 200 for the rest."""
    return 200 + len(row[4] or b"") + len(row[5] or b"")


def _texts(payloads: tuple[bytes | None, ...], error: str, errors: list[list[str]]) -> pa.Array:
    """A string column of the payloads: NULL, and `error` in the row's codes, for one not kept for its size
    (a request: None; a response: `TOO_LARGE`; a response None is an answer without a body)."""
    import pyarrow as pa

    too_large = None if error == "MAX_REQUEST_SIZE_EXCEEDED" else TOO_LARGE
    kept = [None if p is None or p is TOO_LARGE else p for p in payloads]
    for i, payload in enumerate(payloads):
        if payload is too_large:
            errors[i].append(error)
    column = pa.array(kept, pa.binary())
    try:
        return column.cast(pa.string())  # validates UTF-8 in C, for the whole batch
    except pa.ArrowInvalid:  # some payload is not UTF-8: decode each, replacing what is not
        return pa.array([None if v is None else v.decode("utf-8", "replace") for v in kept], pa.string())


def to_table(rows: list[Row]) -> pa.Table:
    """The payload table's columns from the rows `InferenceLog.record` queued."""
    import pyarrow as pa

    ids, received, statuses, executed, requests, responses, entities, requesters = zip(*rows, strict=True)
    errors: list[list[str]] = [[] for _ in rows]
    request_text = _texts(requests, "MAX_REQUEST_SIZE_EXCEEDED", errors)
    response_text = _texts(responses, "MAX_RESPONSE_SIZE_EXCEEDED", errors)
    micros = [round(t * 1e6) for t in received]
    clients = [client_request_id(body) if body is not None else None for body in requests]
    columns = [
        pa.array([i or uuid.uuid4().hex for i in ids], pa.string()),
        pa.array(clients, pa.string()),
        pa.array([t // 86_400_000_000 for t in micros], pa.int32()).cast(pa.date32()),
        pa.array(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        pa.array(statuses, pa.int32()),
        pa.array([1.0] * len(rows), pa.float64()),
        pa.array(executed, pa.int64()),
        request_text,
        response_text,
        pa.array(entities, pa.string()),
        pa.array(requesters, pa.string()),
        pa.array(errors, pa.list_(pa.string())),
    ]
    return pa.Table.from_arrays(columns, schema=schema())


def _append(uri: str, table: pa.Table) -> None:
    from deltalake import write_deltalake

    write_deltalake(uri, table, mode="append", partition_by=["request_date"],
                    configuration={"delta.appendOnly": "true"})
