"""Limits on what one request may carry, and the cheap checks that enforce them.

    limit                    default     setting                      refused with
    body                     16 MiB      BERTH_MAX_BODY_MB            413 PAYLOAD_TOO_LARGE        (gateway)
    all request headers      64 KiB      BERTH_MAX_HEADER_KB          431 REQUEST_HEADER_FIELDS_TOO_LARGE (gateway)
    one request header       16 KiB      BERTH_MAX_HEADER_FIELD_KB    431 REQUEST_HEADER_FIELDS_TOO_LARGE (gateway)
    JSON nesting depth       64          BERTH_MAX_JSON_DEPTH         400 BAD_REQUEST    (control plane, replica)
    rows of one invocation   100,000     BERTH_MAX_ROWS               400 BAD_REQUEST    (replica)

A header's size is its name and value bytes. Depth counts nested arrays and objects:
`{"inputs": [[1, 2]]}` is 3 deep. Rows are those of `dataframe_split.data`, `dataframe_records`,
`instances` or `inputs` (a list's length; a columnar object's longest column), or of a CSV or
Parquet body. Nothing here imports more than the standard library: replicas use it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from berth.errors import BadRequest, BerthError, HeadersTooLarge, PayloadTooLarge

KIB = 2**10
MIB = 2**20
DEFAULT_MAX_BODY_BYTES = 16 * MIB
DEFAULT_MAX_HEADER_BYTES = 64 * KIB
DEFAULT_MAX_HEADER_FIELD_BYTES = 16 * KIB
DEFAULT_MAX_JSON_DEPTH = 64
DEFAULT_MAX_ROWS = 100_000
# orjson refuses documents nested deeper than this ("depth limit exceeded"), whatever Berth's limit.
ORJSON_MAX_DEPTH = 1024
# The numeric fast path (berth.replica.fastpath) only takes bodies nested at most this deep.
FAST_PATH_DEPTH = 4
ROW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


@dataclass(frozen=True)
class PayloadLimits:
    """What one request may carry (built from `Settings` by `from_settings`)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_header_field_bytes: int = DEFAULT_MAX_HEADER_FIELD_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes", "max_header_field_bytes", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}.")
        if not FAST_PATH_DEPTH <= self.max_json_depth <= ORJSON_MAX_DEPTH:
            raise ValueError(f"BERTH_MAX_JSON_DEPTH must be between {FAST_PATH_DEPTH} and {ORJSON_MAX_DEPTH} "
                             f"(a dataframe_split body is {FAST_PATH_DEPTH} deep); got {self.max_json_depth}.")

    @classmethod
    def from_settings(cls, settings: Any) -> PayloadLimits:
        """The limits of a `berth.settings.Settings` (sizes there are in MB and KB: MiB and KiB)."""
        return cls(
            max_body_bytes=int(settings.max_body_mb * MIB),
            max_header_bytes=int(settings.max_header_kb * KIB),
            max_header_field_bytes=int(settings.max_header_field_kb * KIB),
            max_json_depth=settings.max_json_depth,
            max_rows=settings.max_rows,
        )

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PayloadLimits:
        return cls(**{k: int(v) for k, v in data.items()})


# Errors, with messages that name the limit and its setting
def body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {_size(limit)} ({limit} bytes; "
                           "BERTH_MAX_BODY_MB).")


def too_deep_error(limit: int) -> BadRequest:
    return BadRequest(f"The request's JSON is nested deeper than the limit of {limit} levels of arrays and "
                      "objects (BERTH_MAX_JSON_DEPTH).")


def too_many_rows_error(rows: int, limit: int) -> BadRequest:
    return BadRequest(f"The request has {rows} rows; the limit is {limit} rows per request (BERTH_MAX_ROWS). "
                      "Send the rows in several requests.")


def _size(n: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


# Checks
def check_head(headers: Iterable[tuple[bytes, bytes]], limits: PayloadLimits) -> BerthError | None:
    """The refusal for a request whose headers (one, or all together) are over the limits, or whose
    Content-Length announces a body over the limit; None for the others. One pass, no allocation."""
    total = 0
    one = limits.max_header_field_bytes
    for name, value in headers:
        size = len(name) + len(value)
        if size > one:
            return HeadersTooLarge(f"The request header '{name[:64].decode('latin-1')}' is {size} bytes; one "
                                   f"header may have at most {_size(one)} (BERTH_MAX_HEADER_FIELD_KB).")
        total += size
        if name == b"content-length" and value.isdigit() and int(value) > limits.max_body_bytes:
            return body_too_large(limits.max_body_bytes)
    if total > limits.max_header_bytes:
        return HeadersTooLarge(f"The request headers are {total} bytes together; the limit is "
                               f"{_size(limits.max_header_bytes)} (BERTH_MAX_HEADER_KB).")
    return None


def too_deep(obj: Any, limit: int) -> bool:
    """Whether parsed JSON nests arrays and objects deeper than `limit`. Iterative, so any depth is safe;
    it visits each container once (~1 µs per row of a parsed table)."""
    if limit <= 0:
        return isinstance(obj, list | dict)
    stack: list[tuple[Any, int]] = [(obj, 1)] if isinstance(obj, list | dict) else []
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is list or kind is dict:
                if depth == limit:
                    return True
                push((child, depth + 1))
    return False


def rows_in(obj: Any) -> int:
    """The rows of a parsed scoring request (see the module docstring); 0 for other bodies."""
    if not isinstance(obj, dict):
        return 0
    rows = 0
    for key in ROW_KEYS:
        value = obj.get(key)
        if value is None:
            continue
        if key == "dataframe_split":
            value = value.get("data") if isinstance(value, dict) else None
            n = len(value) if isinstance(value, list) else 0
        elif isinstance(value, list):
            n = len(value)
        elif isinstance(value, dict):  # columnar: {"column": [values]}
            n = max((len(v) for v in value.values() if isinstance(v, list)), default=1)
        else:
            n = 1
        rows = max(rows, n)
    return rows


def is_depth_error(exc: Exception) -> bool:
    """Whether orjson refused a document for its nesting (over `ORJSON_MAX_DEPTH`): "depth limit exceeded"
    in orjson 3.13, "Recursion limit reached" in older releases."""
    text = str(exc)
    return "depth limit" in text or "Recursion limit" in text
