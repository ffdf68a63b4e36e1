"""The platform's own log: one record per line on stderr, as text for a terminal or as JSON for a
log pipeline (`BERTH_LOG_FORMAT=json`, python-json-logger's orjson formatter).

A JSON line holds `time` (ISO 8601, UTC), `level`, `logger`, `message`, `process` (`main` or
`gateway-N`), `pid`, whatever the call passed as `extra=` (e.g. `endpoint`, `entity`, `url`), and
`exc_info` for an exception. Replicas keep their own stdout/stderr: the served-model logs API
returns those as the model wrote them.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.orjson import OrjsonFormatter

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
_TEXT = "%(asctime)s %(levelname)s %(name)s [%(process_name)s]: %(message)s"
_JSON = ("levelname", "name", "message", "process")


class _ProcessName(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.process_name = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self.process_name
        return True


def json_formatter() -> logging.Formatter:
    return OrjsonFormatter(
        list(_JSON), timestamp="time",  # ISO 8601 in UTC, to the microsecond
        rename_fields={"levelname": "level", "name": "logger", "process": "pid", "process_name": "process"},
    )


def configure_logging(fmt: str = "text", level: str = "info", process: str = "main") -> None:
    """Send every logger's records (uvicorn's included) to stderr in `fmt`, from `level` up."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessName(process))
    handler.setFormatter(json_formatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "alembic", "mlflow"):  # their info lines are about themselves
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
