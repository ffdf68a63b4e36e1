"""The local user's credentials file: where `berth serve`/`berth server` leave host and token.

Found at `$BERTH_CONFIG_DIR/credentials.json`, else `$XDG_CONFIG_HOME/berth/…`, else
`~/.config/berth/…`; written with mode 0600.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Credentials:
    host: str
    token: str


def credentials_path() -> Path:
    if env := os.environ.get("BERTH_CONFIG_DIR"):
        return Path(env).expanduser() / "credentials.json"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "berth" / "credentials.json"


def read_credentials(path: Path | None = None) -> Credentials | None:
    path = path or credentials_path()
    try:
        data = json.loads(path.read_text())
        return Credentials(host=str(data["host"]), token=str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_credentials(creds: Credentials, path: Path | None = None) -> Path:
    path = path or credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"host": creds.host, "token": creds.token}, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
