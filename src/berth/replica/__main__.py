"""Entry point of a replica process: `python -m berth.replica --model-uri URI --socket PATH`.

Exit code 3 means the model could not be loaded (deterministic: the backend does not retry it).
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
import warnings

from berth.backends.base import EXIT_MODEL_LOAD_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="berth.replica")
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--replica-id", required=True)
    parser.add_argument("--name", default="model")
    parser.add_argument("--max-concurrency", type=int, default=16)
    args = parser.parse_args(argv)

    print(f"berth replica {args.replica_id}: loading {args.model_uri}", flush=True)
    try:
        from berth.replica.scoring import Scorer

        scorer = Scorer(args.model_uri)
    except Exception as exc:
        traceback.print_exc()
        print(f"Failed to load model {args.model_uri}: {type(exc).__name__}: {exc}", flush=True)
        return EXIT_MODEL_LOAD_FAILED

    # Warnings are for loading (shown above); while serving, Python would print each at most once anyway.
    # One "ignore" filter also halves scikit-learn's per-tree cost in forests: its joblib wrapper
    # re-installs every warning filter around each tree's predict.
    warnings.resetwarnings()
    warnings.simplefilter("ignore")
    # The loaded model, MLflow and pandas are ~250k objects that live as long as the process: a full
    # garbage collection over them pauses every request in flight (~170 ms here). Frozen, the
    # collector only looks at what requests allocate.
    gc.freeze()

    import uvloop

    from berth.replica.server import ReplicaApp, ReplicaServer

    app = ReplicaApp(scorer, args.replica_id, args.name, args.max_concurrency)
    server = ReplicaServer(app, uds=args.socket)
    listening = (f"berth replica {args.replica_id}: model loaded, serving on {args.socket} "
                 f"(fast path: {scorer.fast_path})")
    uvloop.run(server.serve(on_listening=lambda: print(listening, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
