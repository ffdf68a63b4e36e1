"""The README's serve command works as written: run it, query the endpoint it prints, stop it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import httpx
import psutil
import pytest

from tests.conftest import REPO, interrupt

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert "./scripts/demo" in commands
    assert "./scripts/test" in commands
    assert "./scripts/test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_serve_command_serves_a_demo_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env.update(
        BERTH_PORT="0",
        BERTH_DATA_DIR=str(tmp_path / "data"),
        BERTH_CONFIG_DIR=str(tmp_path / "config"),
        BERTH_DEMO_MODEL=str(tmp_path / "demo-model"),
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["bash", "-c", "./scripts/demo"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while "is READY" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        output = log_path.read_text()
        creds = json.loads((tmp_path / "config" / "credentials.json").read_text())
        assert creds["token"] in output, "the generated token is printed once"
        curl = next(line.strip() for line in output.splitlines() if line.strip().startswith("curl "))
        assert creds["host"] + "/serving-endpoints/demo-model/invocations" in curl
        body = json.loads(re.search(r"-d '(.*)'", curl).group(1))
        response = httpx.post(
            f"{creds['host']}/serving-endpoints/demo-model/invocations",
            json=body,
            headers={"Authorization": f"Bearer {creds['token']}"},
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == len(body["dataframe_split"]["data"])
        # The pasted curl line itself works too.
        result = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=30)
        assert json.loads(result.stdout)["predictions"] == response.json()["predictions"]
        replicas = [
            p for p in psutil.Process(proc.pid).children(recursive=True)
            if "berth.replica" in " ".join(p.cmdline())
        ]
        assert replicas, "the model runs in a replica process of its own"
    finally:
        interrupt(proc)
    assert proc.returncode == 0, log_path.read_text()
    _gone, alive = psutil.wait_procs(replicas, timeout=10)
    assert not alive, "Ctrl-C stops the replicas too"
