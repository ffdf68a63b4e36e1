"""Entry point of a replica process (see `berth.replica.launch` for the three paths).

    python -m berth.replica --model-uri URI --socket PATH --replica-id ID     a fresh replica
    python -m berth.replica --standby --control-fd FD                         a warm-pool process
    python -m berth.replica --template --model-uri URI --control-fd FD        a template to fork from

Exit code 3 means the model could not be loaded (deterministic: the backend does not retry it).
"""

from __future__ import annotations

import argparse
import json
import sys

from berth.payload import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_ROWS
from berth.replica.launch import Channel, ReplicaArgs, run_fresh, run_standby


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="berth.replica")
    parser.add_argument("--model-uri")
    parser.add_argument("--socket")
    parser.add_argument("--replica-id")
    parser.add_argument("--name", default="model")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows per request (BERTH_MAX_ROWS)")
    parser.add_argument("--max-json-depth", type=int, default=DEFAULT_MAX_JSON_DEPTH,
                        help="nesting of a JSON body (BERTH_MAX_JSON_DEPTH)")
    parser.add_argument("--standby", action="store_true", help="wait in the warm pool for an assignment")
    parser.add_argument("--template", action="store_true", help="load the model and fork replicas on request")
    parser.add_argument("--control-fd", type=int, help="the backend's control socket (standby, template)")
    parser.add_argument("--thread-env", default="{}", help="a template's replicas' thread-pool sizes (JSON)")
    args = parser.parse_args(argv)

    if args.standby or args.template:
        if args.control_fd is None:
            parser.error("--standby and --template need --control-fd")
        if args.standby:
            return run_standby(args.control_fd)
        if not args.model_uri:
            parser.error("--template needs --model-uri")
        from berth.replica.template import run_template

        return run_template(args.model_uri, args.name, Channel(args.control_fd), json.loads(args.thread_env))
    if not (args.model_uri and args.socket and args.replica_id):
        parser.error("a replica needs --model-uri, --socket and --replica-id")
    return run_fresh(ReplicaArgs(args.replica_id, args.name, args.socket, args.max_concurrency, args.model_uri,
                                 args.max_rows, args.max_json_depth))


if __name__ == "__main__":
    sys.exit(main())
