"""Entry point of a replica process: `python -m berth.replica --model-uri URI --socket PATH`.

Exit code 3 means the model could not be loaded (deterministic: the backend does not retry it).
"""

from __future__ import annotations

import argparse
import sys
import traceback

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

    import uvicorn

    from berth.replica.server import ReplicaApp

    app = ReplicaApp(scorer, args.replica_id, args.name, args.max_concurrency)
    config = uvicorn.Config(
        app,
        uds=args.socket,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=3600,
    )
    print(f"berth replica {args.replica_id}: model loaded, serving on {args.socket}", flush=True)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
