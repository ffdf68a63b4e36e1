"""How a replica process gets from "started" to "serving", on each of its three paths.

- **fresh**: `python -m berth.replica --model-uri ...` imports everything, loads the model, serves.
- **warm** (`--standby`): a warm-pool process imports the runtime's heavy modules ahead of time,
  then waits on its control socket for an assignment: serve a model as a replica, or hold one as a
  template. Only the model load is left when the assignment comes.
- **fork** (`berth.replica.template`): a template holds a loaded model and forks replicas from it.

The control socket carries one JSON object per line (`Channel`); the backend's end is
`berth.backends.procs.AsyncChannel`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import socket
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from berth.backends.base import EXIT_MODEL_LOAD_FAILED
from berth.payload import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_ROWS, PayloadLimits

if TYPE_CHECKING:
    from berth.replica.scoring import Scorer

# Native thread pools a replica sizes from its environment (the backend's defaults are 1 each).
THREAD_VARS = {"OMP_NUM_THREADS": "openmp", "OPENBLAS_NUM_THREADS": "blas", "MKL_NUM_THREADS": "blas"}


@dataclass(frozen=True)
class ReplicaArgs:
    """What a process needs to serve as one replica."""

    replica_id: str
    name: str
    socket: str
    max_concurrency: int
    model_uri: str
    max_rows: int = DEFAULT_MAX_ROWS  # per request (BERTH_MAX_ROWS)
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH  # of a JSON body (BERTH_MAX_JSON_DEPTH)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplicaArgs:
        return cls(data["replica_id"], data["name"], data["socket"], int(data["max_concurrency"]), data["model_uri"],
                   int(data.get("max_rows", DEFAULT_MAX_ROWS)),
                   int(data.get("max_json_depth", DEFAULT_MAX_JSON_DEPTH)))

    def to_json(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "name": self.name, "socket": self.socket,
                "max_concurrency": self.max_concurrency, "model_uri": self.model_uri,
                "max_rows": self.max_rows, "max_json_depth": self.max_json_depth}

    @property
    def limits(self) -> PayloadLimits:
        """The limits the replica enforces itself (the gateway holds bodies and headers to theirs)."""
        return PayloadLimits(max_rows=self.max_rows, max_json_depth=self.max_json_depth)


class Channel:
    """The process's end of its control socket: blocking JSON lines."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self._file = self.sock.makefile("rb")

    def send(self, **message: Any) -> None:
        self.sock.sendall(orjson.dumps(message) + b"\n")

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the backend closed its end."""
        line = self._file.readline()
        return orjson.loads(line) if line else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self.sock.close()


def set_title(kind: str, args: ReplicaArgs | None = None, **extra: str) -> None:
    """Name the process for `ps` and for tests that find replicas by command line."""
    import setproctitle

    parts = ["berth.replica", f"--{kind}"]
    if args is not None:
        parts += ["--replica-id", args.replica_id, "--name", args.name, "--socket", args.socket,
                  "--model-uri", args.model_uri]
    for key, value in extra.items():
        parts += [f"--{key.replace('_', '-')}", value]
    setproctitle.setproctitle(" ".join(parts))


def import_runtime() -> None:
    """The heavy imports of the pyfunc runtime, done once before any model is known (~1.5 s here)."""
    import mlflow.pyfunc
    import mlflow.pyfunc.scoring_server  # noqa: F401
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import uvloop  # noqa: F401

    import berth.replica.scoring
    import berth.replica.server  # noqa: F401

    with contextlib.suppress(ImportError):
        import sklearn.base  # noqa: F401  # most pyfunc models here are scikit-learn's


def apply_environment(env: dict[str, str]) -> dict[str, str]:
    """An assignment's environment for a process that is already running: variables for the model's
    code, and the thread-pool sizes its native libraries read at import (set through threadpoolctl;
    returned, for the predict thread)."""
    os.environ.update(env)
    threads = {var: env[var] for var in THREAD_VARS if var in env and env[var] != "1"}
    limit_threads(threads)
    return threads


def limit_threads(values: dict[str, str]) -> None:
    """Size the loaded native thread pools (OpenMP, BLAS) from `OMP_NUM_THREADS`-style values."""
    from threadpoolctl import threadpool_limits

    wanted: dict[str, int] = {}
    for var, api in THREAD_VARS.items():
        raw = values.get(var, "")
        if raw.isdigit() and int(raw) > 0:
            wanted[api] = max(wanted.get(api, 0), int(raw))  # OpenBLAS and MKL are both "blas"
    for api, limit in wanted.items():
        threadpool_limits(limits=limit, user_api=api)


def lower_memory_limit(limit_bytes: int) -> None:
    if limit_bytes <= 0:
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or limit_bytes <= hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def redirect_output(log_path: str) -> None:
    """Send this process's stdout and stderr (fds 1 and 2) to its own log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def load(model_uri: str, label: str) -> Scorer | None:
    """Load the model (printing what failed, for the build logs), warm it up, settle the heap."""
    print(f"berth {label}: loading {model_uri}", flush=True)
    print_environment_check(model_uri, label)
    try:
        from berth.replica.scoring import Scorer

        scorer = Scorer(model_uri)
    except Exception as exc:
        traceback.print_exc()
        print(f"Failed to load model {model_uri}: {type(exc).__name__}: {exc}", flush=True)
        return None
    # Warnings are for loading (shown above); while serving, Python would print each at most once anyway.
    # One "ignore" filter also halves scikit-learn's per-tree cost in forests: its joblib wrapper
    # re-installs every warning filter around each tree's predict.
    warnings.resetwarnings()
    warnings.simplefilter("ignore")
    if scorer.warm_up():
        print(f"berth {label}: warmed up on the model's serving example", flush=True)
    # The loaded model, MLflow and pandas are ~250k objects that live as long as the process: a full
    # garbage collection over them pauses every request in flight (~170 ms here). Frozen, the
    # collector only looks at what requests allocate.
    gc.freeze()
    return scorer


def print_environment_check(model_uri: str, label: str) -> None:
    """The model's requirements against this environment, for the build logs; never fails the load."""
    try:
        from berth.runtimes.environment import check_model

        report = check_model(model_uri)
    except Exception as exc:
        print(f"berth {label}: environment check failed: {type(exc).__name__}: {exc}", flush=True)
        return
    if report is None or not report.files:
        return
    for note in report.notes:
        print(f"berth {label}: environment check: {note}")
    verdict = report.warning() or (f"environment check: the {report.checked} requirement(s) of "
                                   f"{' and '.join(report.files)} are met")
    print(f"berth {label}: {verdict}", flush=True)


def serve(scorer: Scorer, args: ReplicaArgs, note: str = "", threads: dict[str, str] | None = None) -> int:
    """Serve the loaded model on the replica's Unix socket until SIGTERM, then drain.

    `threads`: thread-pool sizes set after the process started (`limit_threads`), applied on the
    predict thread too (OpenMP keeps its thread count per thread)."""
    import uvloop

    from berth.replica.server import ReplicaApp, ReplicaServer

    setup = (lambda: limit_threads(threads)) if threads else None
    scorer.limits = args.limits
    app = ReplicaApp(scorer, args.replica_id, args.name, args.max_concurrency, thread_setup=setup)
    server = ReplicaServer(app, uds=args.socket)
    listening = (f"berth replica {args.replica_id}: model loaded, serving on {args.socket} "
                 f"(fast path: {scorer.fast_path}){note}")
    uvloop.run(server.serve(on_listening=lambda: print(listening, flush=True)))
    return 0


def run_fresh(args: ReplicaArgs, threads: dict[str, str] | None = None) -> int:
    scorer = load(args.model_uri, f"replica {args.replica_id}")
    if scorer is None:
        return EXIT_MODEL_LOAD_FAILED
    return serve(scorer, args, threads=threads)


def run_standby(control_fd: int) -> int:
    """A warm-pool process: import, report, then take one assignment (or exit when the pool lets go)."""
    set_title("standby")
    channel = Channel(control_fd)
    import_runtime()
    gc.collect()
    set_title("standby", state="ready")
    channel.send(event="standby", pid=os.getpid())
    order = channel.recv()
    if order is None:
        return 0
    redirect_output(order["log"])
    threads = apply_environment(order.get("env", {}))
    lower_memory_limit(int(order.get("memory_limit_bytes", 0)))
    if order["op"] == "template":
        from berth.replica.template import run_template

        channel.send(event="assigned")
        return run_template(order["model_uri"], order["name"], channel, dict(order.get("thread_env", {})))
    args = ReplicaArgs.from_json(order["replica"])
    set_title("warm", args)
    channel.send(event="assigned")
    channel.close()
    return run_fresh(args, threads)
