"""A small synchronous client for a running Berth server (used by the CLI)."""

from __future__ import annotations

import os
from typing import Any

import httpx

from berth.client.credentials import read_credentials


class BerthClientError(Exception):
    """An error answer from the server, or no server to talk to."""

    def __init__(self, message: str, *, status: int | None = None, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


def resolve_target(host: str | None, token: str | None) -> tuple[str, str]:
    """--host/--token, else BERTH_HOST/BERTH_TOKEN, else the credentials file."""
    host = host or os.environ.get("BERTH_HOST")
    token = token or os.environ.get("BERTH_TOKEN")
    if not host or not token:
        creds = read_credentials()
        # The file's token belongs to the file's host: never send it to another server.
        if creds is not None and (not host or _normalize(host) == _normalize(creds.host)):
            host = host or creds.host
            token = token or creds.token
    if host and not token:
        raise BerthClientError(f"No token for {host}: pass --token or set BERTH_TOKEN.")
    if not host or not token:
        raise BerthClientError(
            "No Berth server configured: pass --host and --token, set BERTH_HOST and BERTH_TOKEN, "
            "or start one with `berth server` / `berth serve` (they write a credentials file)."
        )
    return _normalize(host), token


def _normalize(host: str) -> str:
    if "://" not in host:
        host = f"http://{host}"
    return host.rstrip("/")


class BerthClient:
    """Thin wrapper over httpx with Berth's auth and error handling."""

    def __init__(self, host: str | None = None, token: str | None = None, timeout: float = 60.0) -> None:
        self.host, token = resolve_target(host, token)
        self._http = httpx.Client(
            base_url=self.host, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BerthClientError(f"Cannot reach the Berth server at {self.host}: {exc}") from exc
        if response.status_code >= 400:
            try:
                payload = response.json()
                message = payload.get("message", response.text)
                code = payload.get("error_code")
            except ValueError:
                message, code = response.text, None
            raise BerthClientError(
                f"{response.status_code} {code or ''}: {message}".replace("  ", " "),
                status=response.status_code,
                error_code=code,
            )
        return response

    def api(self, method: str, path: str, json: Any = None) -> Any:
        return self.request(method, f"/api/2.0/serving-endpoints{path}", json=json).json()

    def close(self) -> None:
        self._http.close()
