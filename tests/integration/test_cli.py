"""The `berth` command line against a real server, run as real subprocesses."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.both_stores  # every server test here runs on SQLite and on PostgreSQL

FEATURES = [f"f{i}" for i in range(20)]
ROWS = {"dataframe_split": {"columns": FEATURES, "data": [[0.1] * 20, [2.0] * 20]}}


def berth(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m berth ARGS` with no BERTH_* variables but those given."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "berth", *args],
        env=full_env, cwd=str(cwd or REPO), capture_output=True, text=True, timeout=120,
    )


def one_line(text: str) -> str:
    """Human-oriented output with its line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def no_creds(tmp_path: Path) -> dict[str, str]:
    """An empty config dir, so no credentials file is found by accident."""
    return {"BERTH_CONFIG_DIR": str(tmp_path / "empty-config")}


@pytest.fixture
def flags(shared_server: Any) -> list[str]:
    return ["--host", shared_server.url, "--token", shared_server.token]


@pytest.fixture(scope="module")
def classifier_endpoint(shared_server: Any, model_zoo: Any) -> Iterator[str]:
    """One READY classifier endpoint shared by the read-only tests of this module."""
    name = f"cli-classifier-{uuid.uuid4().hex[:8]}"
    shared_server.deploy(name, model_zoo("sklearn_classifier"))
    yield name
    shared_server.api("DELETE", f"/{name}")


def test_endpoint_lifecycle_through_the_cli(shared_server, model_zoo, unique_name, flags, no_creds):
    classifier, tensor = model_zoo("sklearn_classifier"), model_zoo("tensor_model")

    # A relative --model-uri is resolved against the caller's directory.
    created = berth("endpoints", "create", unique_name, "--model-uri", classifier.name, *flags,
                    env=no_creds, cwd=classifier.parent)
    assert created.returncode == 0, created.stderr
    view = json.loads(created.stdout)
    assert view["name"] == unique_name
    assert view["state"]["config_update"] == "IN_PROGRESS"
    assert view["pending_config"]["served_entities"][0]["entity_name"] == str(classifier)
    assert view["pending_config"]["served_entities"][0]["workload_size"] == "Small"
    shared_server.wait_not_updating(unique_name)

    got = berth("endpoints", "get", unique_name, *flags, env=no_creds)
    assert got.returncode == 0, got.stderr
    view = json.loads(got.stdout)
    assert view["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    assert view["config"]["config_version"] == 1

    listed = berth("endpoints", "list", *flags, env=no_creds)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [unique_name, "READY", "NOT_UPDATING"] in rows

    answer = berth("query", unique_name, "--json", json.dumps(ROWS), *flags, env=no_creds)
    assert answer.returncode == 0, answer.stderr
    assert len(json.loads(answer.stdout)["predictions"]) == 2
    served = view["config"]["served_entities"][0]["name"]
    assert f"served-model-name: {served}" in answer.stderr

    updated = berth("endpoints", "update", unique_name, "--model-uri", str(tensor), *flags, env=no_creds)
    assert updated.returncode == 0, updated.stderr
    view = json.loads(updated.stdout)
    assert view["state"]["config_update"] == "IN_PROGRESS"
    assert view["pending_config"]["served_entities"][0]["entity_name"] == str(tensor)
    assert view["config"]["served_entities"][0]["entity_name"] == str(classifier)
    after = shared_server.wait_not_updating(unique_name)
    assert after["config"]["config_version"] == 2
    answer = berth("query", unique_name, "--json", '{"inputs": [[1, 2, 3]]}', *flags, env=no_creds)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["predictions"] == pytest.approx([6.0])

    deleted = berth("endpoints", "delete", unique_name, *flags, env=no_creds)
    assert deleted.returncode == 0, deleted.stderr
    assert f"Deleted endpoint {unique_name}." in one_line(deleted.stdout)
    assert shared_server.api("GET", f"/{unique_name}").status_code == 404

    gone = berth("endpoints", "get", unique_name, *flags, env=no_creds)
    assert gone.returncode == 1
    assert gone.stdout == ""
    assert f"404 RESOURCE_DOES_NOT_EXIST: Endpoint '{unique_name}' does not exist." in one_line(gone.stderr)


def test_list_prints_one_tab_separated_row_per_endpoint(shared_server, model_zoo, flags, no_creds):
    """Rows stay whole (no wrapping at the terminal width) and keep their tabs, for `cut -f1`."""
    name = (f"long-{uuid.uuid4().hex}-" + "x" * 63)[:63]
    model = str(model_zoo("tensor_model"))
    created = shared_server.create(name, {"served_entities": [{"entity_name": model}]})
    assert created.status_code == 200, created.text
    try:
        listed = berth("endpoints", "list", *flags, env=no_creds)
        assert listed.returncode == 0, listed.stderr
        rows = [line.split("\t") for line in listed.stdout.splitlines()]
        assert all(len(row) == 3 for row in rows), listed.stdout
        (row,) = [row for row in rows if row[0] == name]
        assert row[1] in ("READY", "NOT_READY")
        assert row[2] in ("IN_PROGRESS", "NOT_UPDATING")
    finally:
        shared_server.api("DELETE", f"/{name}")


def test_query_from_a_json_file_and_a_csv_file(classifier_endpoint, flags, no_creds, tmp_path):
    body = tmp_path / "body.json"
    body.write_text(json.dumps(ROWS))
    from_json = berth("query", classifier_endpoint, "--json", f"@{body}", *flags, env=no_creds)
    assert from_json.returncode == 0, from_json.stderr
    expected = json.loads(from_json.stdout)["predictions"]
    assert len(expected) == 2

    csv = tmp_path / "rows.csv"
    csv.write_text(",".join(FEATURES) + "\n" + ",".join(["0.1"] * 20) + "\n" + ",".join(["2.0"] * 20) + "\n")
    from_csv = berth("query", classifier_endpoint, "--csv", str(csv), *flags, env=no_creds)
    assert from_csv.returncode == 0, from_csv.stderr
    assert json.loads(from_csv.stdout)["predictions"] == expected


def test_query_needs_exactly_one_input(classifier_endpoint, flags, no_creds, tmp_path):
    neither = berth("query", classifier_endpoint, *flags, env=no_creds)
    assert neither.returncode == 2
    assert "Pass exactly one of --json or --csv." in one_line(neither.stderr)
    csv = tmp_path / "rows.csv"
    csv.write_text("x\n1\n")
    both = berth("query", classifier_endpoint, "--json", "{}", "--csv", str(csv), *flags, env=no_creds)
    assert both.returncode == 2


def test_finds_the_server_from_environment_variables(classifier_endpoint, shared_server, no_creds):
    env = {**no_creds, "BERTH_HOST": shared_server.url, "BERTH_TOKEN": shared_server.token}
    got = berth("endpoints", "get", classifier_endpoint, env=env)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["name"] == classifier_endpoint
    answer = berth("query", classifier_endpoint, "--json", json.dumps(ROWS), env=env)
    assert answer.returncode == 0, answer.stderr
    assert len(json.loads(answer.stdout)["predictions"]) == 2


def test_flags_take_precedence_over_environment_variables(classifier_endpoint, flags, no_creds):
    env = {**no_creds, "BERTH_HOST": "http://127.0.0.1:9", "BERTH_TOKEN": "berth_wrong"}
    got = berth("endpoints", "get", classifier_endpoint, *flags, env=env)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["name"] == classifier_endpoint


def test_finds_the_server_from_the_credentials_file(classifier_endpoint, shared_server):
    creds = shared_server.config_dir / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert json.loads(creds.read_text()) == {"host": shared_server.url, "token": shared_server.token}
    env = {"BERTH_CONFIG_DIR": str(shared_server.config_dir)}

    listed = berth("endpoints", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert classifier_endpoint in [line.split("\t")[0] for line in listed.stdout.splitlines()]
    answer = berth("query", classifier_endpoint, "--json", json.dumps(ROWS), env=env)
    assert answer.returncode == 0, answer.stderr
    assert len(json.loads(answer.stdout)["predictions"]) == 2

    # An environment variable overrides the file's value: here a wrong token.
    wrong = berth("endpoints", "list", env={**env, "BERTH_TOKEN": "berth_wrong"})
    assert wrong.returncode == 1
    assert "401 UNAUTHENTICATED" in one_line(wrong.stderr)


@pytest.fixture
def other_server() -> Iterator[tuple[str, list[str | None]]]:
    """A stand-in for some other server: answers every request, records its Authorization header."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = b'{"endpoints": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def test_the_credentials_file_token_goes_only_to_its_own_host(shared_server, other_server):
    env = {"BERTH_CONFIG_DIR": str(shared_server.config_dir)}
    url, seen = other_server
    for other in (["--host", url], []):
        result = berth("endpoints", "list", *other, env={**env, "BERTH_HOST": url} if not other else env)
        assert result.returncode == 1
        assert f"No token for {url}: pass --token or set BERTH_TOKEN." in one_line(result.stderr)
    assert seen == [], "nothing, least of all the local admin token, was sent to the other host"

    # The same host, spelt without the scheme and with a trailing slash, does get the file's token.
    same = shared_server.url.removeprefix("http://") + "/"
    listed = berth("endpoints", "list", "--host", same, env=env)
    assert listed.returncode == 0, listed.stderr


@pytest.mark.parametrize("command", [["endpoints", "list"], ["query", "anything", "--json", "{}"]])
def test_a_bad_token_is_a_clear_error(shared_server, no_creds, command):
    result = berth(*command, "--host", shared_server.url, "--token", "berth_not_a_valid_token", env=no_creds)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "401 UNAUTHENTICATED: Invalid access token." in one_line(result.stderr)
    assert "Traceback" not in result.stderr


def test_no_server_configured_is_a_clear_error(no_creds):
    result = berth("endpoints", "list", env=no_creds)
    assert result.returncode == 1
    assert "No Berth server configured" in one_line(result.stderr)
    assert "Traceback" not in result.stderr


def test_an_unreachable_server_is_a_clear_error(no_creds):
    result = berth("endpoints", "list", "--host", "http://127.0.0.1:9", "--token", "t", env=no_creds)
    assert result.returncode == 1
    assert "Cannot reach the Berth server at http://127.0.0.1:9" in one_line(result.stderr)
    assert "Traceback" not in result.stderr


def test_server_errors_are_printed_with_their_code(shared_server, model_zoo, flags, no_creds):
    missing = f"no-such-endpoint-{uuid.uuid4().hex[:8]}"
    for command in (["endpoints", "get", missing], ["endpoints", "delete", missing],
                    ["endpoints", "update", missing, "--model-uri", str(model_zoo("tensor_model"))],
                    ["query", missing, "--json", "{}"]):
        result = berth(*command, *flags, env=no_creds)
        assert result.returncode == 1, command
        assert f"404 RESOURCE_DOES_NOT_EXIST: Endpoint '{missing}' does not exist." in one_line(result.stderr)
        assert "Traceback" not in result.stderr

    bad = berth("endpoints", "create", "bad name", "--model-uri", str(model_zoo("tensor_model")), *flags,
                env=no_creds)
    assert bad.returncode == 1
    assert "400 INVALID_PARAMETER_VALUE: Invalid endpoint name 'bad name'" in one_line(bad.stderr)


def test_error_messages_are_printed_verbatim_not_as_markup(model_zoo, flags, no_creds):
    """Server text can contain `[...]`: it must reach the terminal as sent, never crash the CLI."""
    bad = berth("endpoints", "create", "my[/model]", "--model-uri", str(model_zoo("tensor_model")), *flags,
                env=no_creds)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert "Invalid endpoint name 'my[/model]'" in one_line(bad.stderr)
    assert "[A-Za-z0-9_-]" in bad.stderr


def test_query_output_is_printed_verbatim(shared_server, model_zoo, flags, no_creds, unique_name):
    shared_server.deploy(unique_name, model_zoo("no_signature_model"))
    body = {"inputs": ["[/INST] hello", "[bold]plain[/bold]", "[red]"]}
    answer = berth("query", unique_name, "--json", json.dumps(body), *flags, env=no_creds)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["predictions"] == body["inputs"]
    shared_server.api("DELETE", f"/{unique_name}")


def test_create_needs_a_model_uri_or_a_config(flags, no_creds, unique_name):
    neither = berth("endpoints", "create", unique_name, *flags, env=no_creds)
    assert neither.returncode == 2
    assert "Pass exactly one of --model-uri or --config." in one_line(neither.stderr)
    invalid = berth("endpoints", "create", unique_name, "--config", "{not json", *flags, env=no_creds)
    assert invalid.returncode == 2
    assert "--config is not valid JSON" in one_line(invalid.stderr)


def test_decisions_show_the_autoscalers_log(classifier_endpoint, shared_server, flags, no_creds):
    """`berth endpoints decisions` prints one tab-separated row per decision (and JSON with --json)."""
    deadline = time.monotonic() + 30
    while not shared_server.api("GET", f"/{classifier_endpoint}/autoscaler/decisions").json()["decisions"]:
        assert time.monotonic() < deadline, "no decision within 30 s"
        time.sleep(0.2)
    shown = berth("endpoints", "decisions", classifier_endpoint, "--limit", "3", *flags, env=no_creds)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split("\t") for line in shown.stdout.splitlines()]
    assert 1 <= len(rows) <= 3, shown.stdout
    assert all(len(row) == 6 and row[1].startswith("#") and " -> " in row[4] for row in rows), shown.stdout
    as_json = berth("endpoints", "decisions", classifier_endpoint, "--json", *flags, env=no_creds)
    assert as_json.returncode == 0, as_json.stderr
    decisions = json.loads(as_json.stdout)
    assert {"cycle", "desired", "concurrency", "reason", "inputs", "axis"} <= set(decisions[-1])
    missing = berth("endpoints", "decisions", "no-such-endpoint", *flags, env=no_creds)
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr
