"""Rate-limit rules (AI-gateway `rate_limits`): parsing and which windows a caller's request counts in.

Pure: no clock, no I/O. A rule allows `calls` per `renewal_period` (only `minute`) per key:
`endpoint` (every caller together), `user` or `service_principal` (each caller of that kind on its
own, or only the one named by `principal`). A request must fit every rule that applies to it, and
counts in all of them or in none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from berth.access.permissions import Caller
from berth.errors import InvalidParameterValue

WINDOW_S = {"minute": 60}
KEYS = ("endpoint", "user", "service_principal")
MAX_CALLS = 1_000_000  # per window and key: the ring of one key is 8 bytes a call


@dataclass(frozen=True, slots=True)
class RateLimit:
    calls: int
    key: str = "endpoint"
    renewal_period: str = "minute"
    principal: str | None = None

    @property
    def window_s(self) -> int:
        return WINDOW_S[self.renewal_period]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"calls": self.calls, "key": self.key, "renewal_period": self.renewal_period}
        if self.principal is not None:
            out["principal"] = self.principal
        return out


def parse_rate_limits(raw: Any, where: str = "rate_limits") -> tuple[RateLimit, ...]:
    """Validate a `rate_limits` list; 400 INVALID_PARAMETER_VALUE on anything Berth cannot enforce."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidParameterValue(f"'{where}' must be a list of rate limits.")
    rules: list[RateLimit] = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise InvalidParameterValue(f"{at} must be an object with 'calls', 'key' and 'renewal_period'.")
        unknown = set(item) - {"calls", "key", "renewal_period", "principal", "tokens"}
        if unknown:
            raise InvalidParameterValue(f"{at} has unknown field(s): {', '.join(sorted(unknown))}.")
        if item.get("tokens") is not None:
            raise InvalidParameterValue(f"{at}.tokens: token limits apply to LLM endpoints, which Berth does not "
                                        "serve yet; limit 'calls' instead.")
        calls = item.get("calls")
        if isinstance(calls, bool) or not isinstance(calls, int) or not 1 <= calls <= MAX_CALLS:
            raise InvalidParameterValue(f"{at}.calls must be an integer from 1 to {MAX_CALLS:,}; got {calls!r}.")
        key = item.get("key", "endpoint") or "endpoint"
        if key == "user_group":
            raise InvalidParameterValue(f"{at}.key 'user_group': groups are not supported yet; "
                                        "use 'user' or 'endpoint'.")
        if key not in KEYS:
            raise InvalidParameterValue(f"{at}.key must be one of {', '.join(KEYS)}; got {key!r}.")
        period = item.get("renewal_period", "minute") or "minute"
        if period not in WINDOW_S:
            raise InvalidParameterValue(f"{at}.renewal_period must be 'minute'; got {period!r}.")
        principal = item.get("principal")
        if principal is not None and (not isinstance(principal, str) or not principal):
            raise InvalidParameterValue(f"{at}.principal must be a user name or a service principal's "
                                        "application id.")
        if principal is not None and key == "endpoint":
            raise InvalidParameterValue(f"{at}.principal applies to the 'user' and 'service_principal' keys, "
                                        "not to 'endpoint'.")
        rules.append(RateLimit(calls, key, period, principal))
    keyed = [(r.key, r.principal) for r in rules]
    if len(set(keyed)) != len(keyed):
        raise InvalidParameterValue(f"'{where}' has two limits with the same key and principal.")
    return tuple(rules)


def windows(rules: Sequence[RateLimit], endpoint: str, caller: Caller) -> list[tuple[str, int, int]]:
    """The (window key, calls, window seconds) a request by `caller` to `endpoint` counts in.

    A rule naming a `principal` replaces the general rule of its key for that caller."""
    named = {r.key for r in rules if r.principal is not None and r.principal == caller.name}
    out = []
    for rule in rules:
        if rule.key == "endpoint":
            out.append((f"endpoint/{endpoint}", rule.calls, rule.window_s))
            continue
        if (rule.key == "service_principal") != (caller.kind == "service_principal"):
            continue
        if (rule.principal is None and rule.key not in named) or rule.principal == caller.name:
            out.append((f"{rule.key}/{endpoint}/{caller.id}", rule.calls, rule.window_s))
    return out
