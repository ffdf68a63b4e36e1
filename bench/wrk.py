"""Run `wrk` with a generated Lua script and read back one JSON result line.

The script sets method, body and headers, counts in its `response` callback every status other
than 200 (429s separately) and every 200 whose body lacks an expected marker, and prints in
`done()` one line `WRK_JSON {...}` with requests, rps, latency percentiles and error counts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

RESULT_PREFIX = "WRK_JSON "
SOCKET_TIMEOUT_S = 30  # far above any latency we expect: a timeout is an error, not a slow request

_LUA_TEMPLATE = """\
wrk.method = {method}
wrk.body = {body}
{headers}
local expect = {expect}

local threads = {{}}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  responses = 0
  non200 = 0
  status_429 = 0
  bad_body = 0
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then
    non200 = non200 + 1
    if status == 429 then
      status_429 = status_429 + 1
    end
  elseif expect ~= nil and (body == nil or not string.find(body, expect, 1, true)) then
    bad_body = bad_body + 1
  end
end

function done(summary, latency, requests)
  local counts = {{responses = 0, non200 = 0, status_429 = 0, bad_body = 0}}
  for _, thread in ipairs(threads) do
    for key, value in pairs(counts) do
      counts[key] = value + (thread:get(key) or 0)
    end
  end
  local seconds = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    '{prefix}{{"requests": %d, "duration_s": %.6f, "rps": %.3f, ' ..
    '"p50_ms": %.4f, "p90_ms": %.4f, "p99_ms": %.4f, "max_ms": %.4f, "mean_ms": %.4f, ' ..
    '"responses": %d, "non200": %d, "status_429": %d, "bad_body": %d, "http_errors": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d}}\\n',
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000,
    counts.responses, counts.non200, counts.status_429, counts.bad_body, e.status,
    e.connect, e.read, e.write, e.timeout))
end
"""


def _lua_string(value: str) -> str:
    """A Lua long-bracket string literal holding `value` verbatim."""
    level = 0
    while f"]{'=' * level}]" in value:
        level += 1
    eq = "=" * level
    return f"[{eq}[{value}]{eq}]"


@dataclass(frozen=True)
class WrkRequest:
    """What every request of a run looks like, and what a good answer must contain."""

    url: str
    method: str = "GET"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    expect_in_body: str | None = None

    def lua_script(self) -> str:
        headers = "\n".join(f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in self.headers)
        expect = _lua_string(self.expect_in_body) if self.expect_in_body is not None else "nil"
        return _LUA_TEMPLATE.format(
            method=_lua_string(self.method),
            body=_lua_string(self.body.decode()) if self.body else "nil",
            headers=headers,
            expect=expect,
            prefix=RESULT_PREFIX,
        )


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. Latencies in milliseconds."""

    connections: int
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    responses: int
    non200: int
    status_429: int
    bad_body: int
    http_errors: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    @property
    def errors(self) -> int:
        """Every request that did not end as a good prediction."""
        return self.non200 + self.bad_body + self.socket_errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "socket_errors": self.socket_errors, "errors": self.errors}


class WrkError(RuntimeError):
    pass


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run_wrk(request: WrkRequest, *, connections: int, duration_s: int, threads: int = 1) -> WrkResult:
    """Run wrk for `duration_s` whole seconds (wrk takes integers) and return its result."""
    binary = wrk_binary()
    if binary is None:
        raise WrkError("wrk is not installed (apt-get install -y wrk, or ./scripts/setup test)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-") as script:
        script.write(request.lua_script())
        script.flush()
        cmd = [
            binary, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", f"--timeout={SOCKET_TIMEOUT_S}s",
            "--latency", "-s", script.name, request.url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + SOCKET_TIMEOUT_S + 30)
    return parse_output(proc.stdout, proc.stderr, proc.returncode, connections)


def parse_output(stdout: str, stderr: str, returncode: int, connections: int) -> WrkResult:
    match = re.search(rf"^{RESULT_PREFIX}(\{{.*\}})$", stdout, re.MULTILINE)
    if returncode != 0 or match is None:
        raise WrkError(f"wrk failed (exit {returncode}):\n{stdout}\n{stderr}")
    data = json.loads(match.group(1))
    return WrkResult(connections=connections, **data)

