"""Fuzz every route of the platform's OpenAPI document with schemathesis, against a real Berth server.

    python -m bench.fuzz --cases 2000 [--seed 0] [--json-out results.json] [--workdir DIR]

Starts `berth server` on an ephemeral loopback port with an admin token, deploys one endpoint with a
real model (so path parameters can name something that exists: that endpoint, its served entity and
id, a user and a service principal made for the run), reads `GET /api/2.0/openapi`, then draws cases
for each operation from schemathesis' strategies (valid and schema-violating, with generated and
with real path parameters) and sends them with the admin token (schemathesis' negative mode also
leaves the token out of some: a secured route must answer those 401; the table counts them apart,
and the run goes on until `--cases` were sent with the token). Each response goes through the checks in
`CHECKS`; `negative_data_rejection` (a schema-violating request must be refused) is reported but not
fatal: it shows where a handler is more lenient than its documented schema. Afterwards the server
must still answer /health and its endpoint a query. Exits 1 on any 5xx, failed fatal check or crash.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.models import build_lr
from bench.procs import BenchError, BerthServer

ENDPOINT = "fuzz"
USER = "fuzz-user@example.com"
SERVICE_PRINCIPAL = "fuzz-sp"
DOC_PATH = "/api/2.0/openapi"
CREATE_PATH = "/api/2.0/serving-endpoints"
REQUEST_TIMEOUT_S = 30.0
FATAL_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "ignored_auth",
)
REPORTED_CHECKS = ("negative_data_rejection",)
CHECKS = FATAL_CHECKS + REPORTED_CHECKS
EXAMPLES_KEPT = 3  # failure examples kept per check


def log(message: str) -> None:
    print(f"[fuzz] {message}", file=sys.stderr, flush=True)


@dataclass
class OperationStats:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    replica_5xx: int = 0  # answered by a model replica (served-model-name set), not by the platform
    without_token: int = 0  # sent without the Authorization header


@dataclass
class CheckStats:
    runs: int = 0
    failures: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class Report:
    seed: int
    operations: dict[str, OperationStats] = field(default_factory=dict)
    checks: dict[str, CheckStats] = field(default_factory=lambda: {name: CheckStats() for name in CHECKS})
    server_errors: list[str] = field(default_factory=list)  # the platform's own 5xx answers
    unguarded: list[str] = field(default_factory=list)  # a secured route that answered a request without a token
    after: dict[str, Any] = field(default_factory=dict)
    runtime_s: float = 0.0

    @property
    def cases(self) -> int:
        return sum(op.cases for op in self.operations.values())

    @property
    def authenticated(self) -> int:
        """Cases sent with the admin token (the rest test that a route refuses a request without one)."""
        return self.cases - sum(op.without_token for op in self.operations.values())

    def statuses(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for op in self.operations.values():
            total.update(op.statuses)
        return total

    def problems(self) -> list[str]:
        out = [f"platform 5xx: {e}" for e in self.server_errors] + self.unguarded
        for name in FATAL_CHECKS:
            stats = self.checks[name]
            if stats.failures:
                out.append(f"{name}: {stats.failures} failure(s), e.g. {stats.examples[:1]}")
        if not self.after.get("healthy"):
            out.append(f"server not healthy after fuzzing: {self.after}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "cases": self.cases,
            "authenticated": self.authenticated,
            "operations": {label: {"cases": op.cases, "statuses": dict(op.statuses), "replica_5xx": op.replica_5xx,
                                   "without_token": op.without_token}
                           for label, op in self.operations.items()},
            "statuses": dict(self.statuses()),
            "checks": {name: {"runs": c.runs, "failures": c.failures, "fatal": name in FATAL_CHECKS,
                              "examples": c.examples} for name, c in self.checks.items()},
            "server_errors": self.server_errors,
            "unguarded": self.unguarded,
            "after": self.after,
            "runtime_s": round(self.runtime_s, 1),
            "ok": not self.problems(),
        }


@dataclass
class Target:
    """The running server, what exists on it, and an authenticated client."""

    url: str
    token: str
    known: dict[str, dict[str, str]]  # operation path → path parameters naming things that exist

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def prepare(server: BerthServer, model: Path) -> Target:
    """Deploy the endpoint and make a user and a service principal for path parameters to name."""
    server.create_endpoint(ENDPOINT, model, concurrency=1)
    view = server.wait_ready(ENDPOINT)
    served = view["config"]["served_entities"][0]["name"]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=30) as c:
        user = c.post("/api/2.0/preview/scim/v2/Users", json={"userName": USER})
        sp = c.post("/api/2.0/preview/scim/v2/ServicePrincipals", json={"displayName": SERVICE_PRINCIPAL})
    if user.status_code != 201 or sp.status_code != 201:
        raise BenchError(f"creating principals failed: {user.status_code} {user.text} / {sp.status_code} {sp.text}")
    user_id, sp_id = user.json()["id"], sp.json()["id"]
    common = {"name": ENDPOINT, "served": served, "endpoint_id": view["id"]}
    known = {"*": common, "Users": {"id": user_id}, "ServicePrincipals": {"id": sp_id},
             "servicePrincipals": {"id": sp_id}}
    return Target(server.url, server.token, known)


def known_parameters(target: Target, path: str, names: Sequence[str]) -> dict[str, str] | None:
    """Path parameters that name existing things for this path (None: it has none to fill)."""
    if not names:
        return None
    pool = dict(target.known["*"])
    for collection in ("Users", "ServicePrincipals", "servicePrincipals"):
        if f"/{collection}/" in path:
            pool.update(target.known[collection])
    filled = {name: pool[name] for name in names if name in pool}
    return filled if len(filled) == len(names) else None


def _describe(failure: BaseException) -> str:
    title = getattr(failure, "title", "") or type(failure).__name__
    message = " ".join((getattr(failure, "message", "") or str(failure)).split())
    return f"{title}: {message[:300]}"


def _order(label: str) -> tuple[int, str]:
    """Reads first, then queries, then writes, rate limits (they throttle the queries), deletes last."""
    method, path = label.split(" ", 1)
    if method == "GET":
        return 0, label
    if path.endswith("/invocations"):
        return 1, label
    if method == "DELETE":
        return 4, label
    if path.endswith(("/ai-gateway", "/rate-limits")):
        return 3, label
    return 2, label


class Fuzzer:
    def __init__(self, target: Target, doc: dict[str, Any], report: Report,
                 endpoint_doc: dict[str, Any] | None = None) -> None:
        import requests
        import schemathesis
        from schemathesis import checks as sc

        self.target = target
        self.report = report
        self.schema = schemathesis.openapi.from_dict(doc)
        self.session = requests.Session()
        self.open_labels = {f"{method.upper()} {path}" for path, item in doc["paths"].items()
                            for method, op in item.items() if isinstance(op, dict) and op.get("security") == []}
        self.checks: list[tuple[str, Callable[..., Any]]] = [(name, getattr(sc, name)) for name in CHECKS]
        operations = [r.ok() for r in self.schema.get_all_operations()]
        if endpoint_doc is not None:  # the endpoint's own query schema: bodies its model takes, and near misses
            operations += [r.ok() for r in schemathesis.openapi.from_dict(endpoint_doc).get_all_operations()]
        self.operations = sorted(operations, key=lambda op: _order(op.label))

    def strategies(self, operation: Any) -> Any:
        """Valid and schema-violating cases, with generated and (where safe) real path parameters."""
        from hypothesis import strategies as st
        from schemathesis import GenerationMode

        names = [p.name for p in operation.path_parameters]
        has_inputs = bool(names or list(operation.query) or operation.body)
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_inputs else [])
        options = [operation.as_strategy(generation_mode=mode) for mode in modes]
        known = known_parameters(self.target, operation.path, names)
        if known is not None and operation.method.upper() != "DELETE":  # deleting what exists ends the run early
            options += [operation.as_strategy(generation_mode=mode, path_parameters=known) for mode in modes]
        return st.one_of(options)

    def run_operation(self, operation: Any, budget: int, seed: int) -> int:
        """Send up to `budget` cases; the number sent (fewer when the operation has fewer distinct inputs)."""
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as hypothesis_seed

        sent = 0

        @hypothesis_seed(seed)
        @settings(max_examples=budget, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
        @given(case=self.strategies(operation))
        def fuzz(case: Any) -> None:
            nonlocal sent
            if sent >= budget:
                return
            sent += 1
            self.execute(case)

        fuzz()
        return sent

    def execute(self, case: Any) -> None:
        from schemathesis.core.failures import Failure, FailureGroup

        label = case.operation.label
        stats = self.report.operations.setdefault(label, OperationStats())
        auth = self.target.auth
        try:
            response = case.call(base_url=self.target.url, session=self.session, headers=auth,
                                 timeout=REQUEST_TIMEOUT_S)
        except Exception as exc:  # no answer at all: the platform crashed or hung
            stats.cases += 1
            stats.statuses[0] += 1
            self.report.server_errors.append(f"{label}: no response ({type(exc).__name__}: {exc})")
            return
        stats.cases += 1
        status = response.status_code
        stats.statuses[status] += 1
        if "authorization" not in {k.lower() for k in response.request.headers}:
            stats.without_token += 1  # schemathesis' negative mode leaves the credentials out on purpose
            if label not in self.open_labels and status != 401:
                self.report.unguarded.append(f"{label} answered {status} without a token")
        if status >= 500:
            if "served-model-name" in response.headers:
                stats.replica_5xx += 1
            else:
                self.report.server_errors.append(f"{label} → {status}: {response.text[:300]} "
                                                 f"[{case.as_curl_command(headers=auth)}]")
        for name, check in self.checks:
            result = self.report.checks[name]
            result.runs += 1
            try:
                case.validate_response(response, checks=[check], headers=auth)
            except (Failure, FailureGroup, AssertionError) as exc:
                result.failures += 1
                if len(result.examples) < EXAMPLES_KEPT:
                    failures = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
                    what = "; ".join(_describe(f) for f in failures)
                    curl = case.as_curl_command(headers=auth)
                    result.examples.append(f"{label} → {status}: {what} [{curl[:400]}]")
        self.cleanup(case, status)

    def cleanup(self, case: Any, status: int) -> None:
        """An endpoint a case created is deleted at once: its made-up model would start replicas."""
        if case.operation.path == CREATE_PATH and case.method.upper() == "POST" and status == 200:
            name = case.body["name"]
            self.session.delete(f"{self.target.url}{CREATE_PATH}/{name}", headers=self.target.auth,
                                timeout=REQUEST_TIMEOUT_S)

    def run(self, cases: int, seed: int) -> None:
        """Rounds over every operation, each taking an equal share of what is left to send, until
        `cases` were sent with the token (or no operation has new inputs)."""
        active = list(self.operations)
        round_no = 0
        while active and self.report.authenticated < cases:
            budget = max(1, math.ceil((cases - self.report.authenticated) / len(active)))
            still = []
            for i, operation in enumerate(active):
                sent = self.run_operation(operation, budget, seed + 1000 * round_no + i)
                if sent >= budget:
                    still.append(operation)
            log(f"round {round_no + 1}: {self.report.cases} cases so far, {self.report.authenticated} with the token")
            active, round_no = still, round_no + 1


def check_after(server: BerthServer, target: Target) -> dict[str, Any]:
    """Is the server still up: /health, its endpoint, and a query once the fuzzed rate limits are gone."""
    out: dict[str, Any] = {"process_alive": server.proc is not None and server.proc.poll() is None}
    try:
        with httpx.Client(base_url=target.url, headers=target.auth, timeout=30) as c:
            out["health"] = c.get("/health").status_code
            out["endpoint"] = c.get(f"{CREATE_PATH}/{ENDPOINT}").status_code
            out["reset_limits"] = c.put(f"{CREATE_PATH}/{ENDPOINT}/ai-gateway", json={}).status_code
            query = {"dataframe_records": [dict.fromkeys((f"f{i}" for i in range(20)), 0.5)]}
            out["query"] = c.post(f"/serving-endpoints/{ENDPOINT}/invocations", json=query).status_code
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["healthy"] = out["process_alive"] and out.get("health") == 200 and out.get("query") == 200
    return out


def fetch_documents(target: Target) -> tuple[dict[str, Any], dict[str, Any]]:
    """The platform's document (validated) and the fuzzed endpoint's own query document."""
    with httpx.Client(base_url=target.url, headers={**target.auth, "Accept": "application/json"}, timeout=30) as c:
        response = c.get(DOC_PATH)
        endpoint = c.get(f"{CREATE_PATH}/{ENDPOINT}/openapi")
    for answer in (response, endpoint):
        if answer.status_code != 200:
            raise BenchError(f"GET {answer.request.url.path}: {answer.status_code} {answer.text[:500]}")
    doc: dict[str, Any] = response.json()
    try:
        from openapi_spec_validator import validate
    except ImportError:
        log("openapi-spec-validator is not installed: the document is checked by schemathesis alone")
    else:
        validate(doc)  # type: ignore[arg-type]
    return doc, endpoint.json()


def format_report(report: Report) -> str:
    width = max([len(label) for label in report.operations] + [9])
    lines = [f"{'operation':<{width}}  {'cases':>5}  {'no token':>8}  statuses"]
    for label, op in sorted(report.operations.items()):
        codes = ", ".join(f"{code}×{n}" for code, n in sorted(op.statuses.items()))
        lines.append(f"{label:<{width}}  {op.cases:>5}  {op.without_token:>8}  {codes}")
    no_token = report.cases - report.authenticated
    lines.append(f"{'total (' + str(len(report.operations)) + ' operations)':<{width}}  {report.cases:>5}  "
                 f"{no_token:>8}")
    lines.append(f"{report.authenticated} cases with the admin token; {no_token} left it out (schemathesis' "
                 f"negative mode): {len(report.unguarded)} of those answered by a secured route with other than 401")
    lines.append("")
    lines.append("status codes: " + ", ".join(f"{c}×{n}" for c, n in sorted(report.statuses().items())))
    replica = sum(op.replica_5xx for op in report.operations.values())
    lines.append(f"5xx: {len(report.server_errors)} from the platform, {replica} from model replicas")
    for error in report.server_errors[:10]:
        lines.append(f"  {error}")
    lines.append("")
    lines.append(f"{'check':<30}{'runs':>7}{'failures':>10}  kind")
    for name, c in report.checks.items():
        kind = "fatal" if name in FATAL_CHECKS else "reported (handler more lenient than the schema)"
        lines.append(f"{name:<30}{c.runs:>7}{c.failures:>10}  {kind}")
        lines.extend(f"    e.g. {example}" for example in c.examples)
    lines.append("")
    after = report.after
    lines.append(f"after fuzzing: process alive {after.get('process_alive')}, /health {after.get('health')}, "
                 f"GET endpoint {after.get('endpoint')}, query {after.get('query')}"
                 + (f", error {after['error']}" if "error" in after else ""))
    lines.append(f"seed {report.seed}, runtime {report.runtime_s:.0f} s")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="cases to send in all (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep the model, server data and log here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: stop the server
    started = time.monotonic()
    report = Report(seed=args.seed)
    with ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir.resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="berth-fuzz-")))
        server = BerthServer(workdir / "server")
        stack.callback(server.stop)
        try:
            log("building the model and starting the server")
            model = workdir / "lr"
            if not (model / "MLmodel").exists():
                shutil.rmtree(model, ignore_errors=True)
                build_lr(model)
            shutil.rmtree(server.workdir, ignore_errors=True)  # a fresh store: no endpoint from an earlier run
            server.start(BERTH_WARM_POOL_MIN="0", BERTH_CRASH_BACKOFF_S="0.2")
            target = prepare(server, model)
            doc, endpoint_doc = fetch_documents(target)
            fuzzer = Fuzzer(target, doc, report, endpoint_doc)
            log(f"{len(fuzzer.operations)} operations, {args.cases} cases")
            fuzzer.run(args.cases, args.seed)
            report.after = check_after(server, target)
        except BenchError as exc:
            log(f"FUZZ FAILED: {exc}")
            return 1
        if not report.after.get("healthy"):
            log(f"server log tail:\n{server.log_path.read_text(errors='replace')[-4000:]}")
    report.runtime_s = time.monotonic() - started
    print(format_report(report), flush=True)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    problems = report.problems()
    if problems:
        log(f"FUZZ FAILED: {len(problems)} problem(s):")
        for problem in problems:
            log(f"  {problem}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
