"""A template: a process that holds one served entity's loaded model and forks replicas from it.

A forked replica shares the template's memory copy-on-write and skips the import and the model load:
it is serving a few milliseconds after the fork. What makes that safe:

- **Reparenting.** The template forks twice; the middle process exits at once, so the replica is
  re-parented to the server (a child subreaper, set by the local backend) and the server waits for
  it, signals it and reads its exit code as for any replica. It then dies with the server
  (PR_SET_PDEATHSIG, set after the re-parenting).
- **Thread pools.** GNU OpenMP cannot be used in a child forked after its pool started: the child
  waits forever for threads it does not have. A template runs every native pool at one thread
  (`OMP_NUM_THREADS=1` and friends from its start), so there is no pool to inherit; each replica sets
  the sizes the entity asked for after the fork, and starts its own threads.
- **No inherited sockets.** A replica closes every socket it inherited (the template's control
  socket) before it opens its own.
- **Fresh randomness.** `random` and numpy's global generator are reseeded in each replica.
- **Single-threaded at the fork.** A template never starts a thread itself; if the model's code
  did, or initialised CUDA or TensorFlow, the template reports itself fork-unsafe and the backend
  starts that entity's replicas as warm-pool or fresh processes instead.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import stat
import sys
import threading
import time
from typing import Any

from berth.backends.base import EXIT_MODEL_LOAD_FAILED
from berth.replica.launch import Channel, ReplicaArgs, limit_threads, load, redirect_output, serve, set_title

_PR_SET_PDEATHSIG = 1


def fork_safety() -> tuple[bool, str]:
    """Whether this process (a loaded template) may fork replicas, and why not."""
    if not sys.platform.startswith("linux"):
        return False, "forking replicas needs Linux"
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return False, f"the model started Python threads ({names})"
    native = _native_threads()
    if native:
        return False, f"the model's native libraries started threads ({', '.join(native)})"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # is_available() would initialise the driver itself
        return False, "the model initialised CUDA"
    if "tensorflow" in sys.modules:
        return False, "TensorFlow's runtime is not fork-safe"
    return True, ""


# Native threads known to survive a fork: jemalloc (bundled by pyarrow and others) restarts its
# background thread in the child through its own atfork handlers.
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})


def _native_threads() -> list[str]:
    """Names of the threads besides the main one that no fork handler takes care of (onnxruntime,
    tokenizers, TBB...): a child would inherit their locks but not the threads."""
    me = str(threading.get_native_id())
    names = []
    for tid in os.listdir("/proc/self/task"):
        if tid == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name not in FORK_SAFE_THREADS:
            names.append(name)
    return names


def run_template(model_uri: str, name: str, channel: Channel, thread_env: dict[str, str]) -> int:
    """Load the model, report whether it can be forked, then fork a replica per request."""
    set_title("template", name=name, model_uri=model_uri)
    started = time.perf_counter()
    scorer = load(model_uri, f"template {name}")
    if scorer is None:
        return EXIT_MODEL_LOAD_FAILED
    import uvloop  # noqa: F401  # what every replica needs, imported once here

    import berth.replica.server  # noqa: F401

    safe, reason = fork_safety()
    channel.send(event="template", fork_safe=safe, reason=reason, load_s=round(time.perf_counter() - started, 3))
    if not safe:
        print(f"berth template {name}: cannot fork replicas: {reason}", flush=True)
        return 0
    server_pid = os.getppid()
    while (order := channel.recv()) is not None:
        if order["op"] != "fork":
            channel.send(error=f"unknown op {order['op']!r}")
            continue
        args = ReplicaArgs.from_json(order["replica"])
        try:
            pid = _fork(scorer, args, order["log"], server_pid, channel, thread_env)
        except OSError as exc:
            channel.send(error=f"fork failed: {exc}")
            continue
        channel.send(pid=pid)
    return 0


def _fork(scorer: Any, args: ReplicaArgs, log_path: str, server_pid: int, channel: Channel,
          thread_env: dict[str, str]) -> int:
    """Fork a replica that the server adopts; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    template = os.getpid()
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        code = 1
        try:
            os.close(read_end)
            me = os.getpid()
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                _become_replica(scorer, args, log_path, (template, me), server_pid, thread_env)  # never returns
            os.write(write_end, str(pid).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        os.waitpid(middle, 0)
        raw = os.read(read_end, 32)
    finally:
        os.close(read_end)
    if not raw:
        raise OSError("the intermediate process did not report the replica's pid")
    return int(raw)


def _become_replica(scorer: Any, args: ReplicaArgs, log_path: str, parents: tuple[int, int], server_pid: int,
                    thread_env: dict[str, str]) -> None:
    template, middle = parents
    code = 1
    try:
        forked_at = time.perf_counter()
        while os.getppid() == middle:  # the middle process is exiting: wait to be adopted
            time.sleep(0.0001)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != server_pid:  # adopted by someone else: the server is gone
            os._exit(1)
        os.setsid()  # its own session, like every replica: a terminal's Ctrl-C reaches only the server
        redirect_output(log_path)
        _close_inherited_sockets()
        random.seed()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
        threads = {var: value for var, value in thread_env.items() if value != "1"}
        if threads:  # the template runs every pool at one thread
            limit_threads(threads)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        set_title("forked", args)
        note = f" (forked from template {template}, adopted in {(time.perf_counter() - forked_at) * 1e3:.1f} ms)"
        code = serve(scorer, args, note, threads)
    except BaseException:  # never return into the template's loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _close_inherited_sockets() -> None:
    """Put /dev/null in place of every inherited socket: the connection is gone from this process,
    and its fd number stays taken (a model object that still holds it writes nowhere, never into a
    socket this replica opens later)."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd <= 2 or fd == null:
                continue
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
            except OSError:
                continue
    finally:
        os.close(null)
