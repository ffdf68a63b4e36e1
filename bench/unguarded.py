"""`berth server` with its hot-path guards switched off in this process: the counterfactual that
`bench.hot_path_cost` measures the guards against. Never a product setting.

    python -m bench.unguarded server --port 0 ...   # as `berth server`, but every caller is an admin

Authentication answers one constant admin caller without looking at the header, and the CAN_QUERY
check always passes; everything else (routing, admission, the replica) is the product's own code.
"""

from __future__ import annotations

from berth.access.permissions import Caller
from berth.gateway.auth import TokenAuthority

ANYONE = Caller("bench", "bench", "user", admin=True)


def _authenticate(self: TokenAuthority, authorization: bytes | None) -> Caller:
    return ANYONE


def _may_query(self: TokenAuthority, caller: Caller, endpoint: str) -> bool:
    return True


def main() -> None:
    TokenAuthority.authenticate = _authenticate  # type: ignore[method-assign]
    TokenAuthority.may_query = _may_query  # type: ignore[method-assign]
    from berth.cli import main as berth_main

    berth_main()


if __name__ == "__main__":
    main()
