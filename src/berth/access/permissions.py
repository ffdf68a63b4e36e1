"""Permission levels on serving endpoints and the pure rules over them (no I/O).

Levels are ordered: `CAN_MANAGE` ⊃ `CAN_QUERY` ⊃ `CAN_VIEW`. Admins hold `CAN_MANAGE` on every
endpoint; everyone else holds what the endpoint's access-control list grants them directly (the
creator gets `CAN_MANAGE`). Groups are out of scope: a `group_name` entry is refused.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from berth.errors import InvalidParameterValue


class Level(enum.IntEnum):
    CAN_VIEW = 1
    CAN_QUERY = 2
    CAN_MANAGE = 3


DESCRIPTIONS = {
    Level.CAN_VIEW: "Can view the endpoint, its config, state, metrics and OpenAPI document.",
    Level.CAN_QUERY: "Can view and query the endpoint.",
    Level.CAN_MANAGE: "Can view, query, update, delete the endpoint and change its permissions.",
}


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated principal: its id, the name ACLs use (userName, or a service principal's
    applicationId), its kind (`user` | `service_principal`) and whether it is an admin."""

    id: str
    name: str
    kind: str = "user"
    admin: bool = False


def level_of(caller: Caller, acl: Mapping[str, Level]) -> Level | None:
    """The caller's level on an endpoint with this ACL (principal id → level); None: no access."""
    if caller.admin:
        return Level.CAN_MANAGE
    return acl.get(caller.id)


def allows(caller: Caller, acl: Mapping[str, Level], needed: Level) -> bool:
    level = level_of(caller, acl)
    return level is not None and level >= needed


def parse_level(value: Any) -> Level:
    try:
        return Level[str(value)]
    except KeyError:
        names = ", ".join(level.name for level in Level)
        raise InvalidParameterValue(f"Invalid permission_level '{value}'; expected one of {names}.") from None


def parse_acl(body: Any, resolve: Callable[[str, str], str | None]) -> dict[str, Level]:
    """The `access_control_list` of a PUT/PATCH body as principal id → level.

    `resolve(kind, name)` finds a principal's id (`kind` is `user` or `service_principal`), or None.
    Every entry is checked before anything is returned, so a bad entry changes nothing.
    """
    if not isinstance(body, dict):
        raise InvalidParameterValue("Request body must be a JSON object.")
    entries = body.get("access_control_list", [])
    if not isinstance(entries, list):
        raise InvalidParameterValue("'access_control_list' must be a list.")
    out: dict[str, Level] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidParameterValue("Each access_control_list entry must be an object.")
        if "group_name" in entry:
            raise InvalidParameterValue("group_name is not supported: grant users or service principals.")
        named = [(kind, entry[key]) for key, kind in (("user_name", "user"),
                                                      ("service_principal_name", "service_principal"))
                 if key in entry]
        if len(named) != 1 or not isinstance(named[0][1], str):
            raise InvalidParameterValue("Each entry needs exactly one of user_name or service_principal_name.")
        kind, name = named[0]
        principal = resolve(kind, name)
        if principal is None:
            label = "User" if kind == "user" else "Service principal"
            raise InvalidParameterValue(f"{label} '{name}' does not exist.")
        level = parse_level(entry.get("permission_level"))
        out[principal] = max(level, out.get(principal, level))
    return out


def acl_view(object_id: str, acl: Mapping[str, Level], principals: Mapping[str, Caller],
             admins: Iterable[Caller]) -> dict[str, Any]:
    """The Permissions API's answer: direct grants, then admins' inherited `CAN_MANAGE`."""
    rows: list[dict[str, Any]] = []
    for pid, level in sorted(acl.items(), key=lambda kv: (-kv[1], kv[0])):
        who = principals.get(pid)
        if who is None:
            continue
        rows.append({**_name(who), "all_permissions": [{"permission_level": level.name, "inherited": False}]})
    for admin in admins:
        rows.append({**_name(admin), "all_permissions": [{"permission_level": Level.CAN_MANAGE.name,
                                                           "inherited": True,
                                                           "inherited_from_object": ["/serving-endpoints/"]}]})
    return {"object_id": f"/serving-endpoints/{object_id}", "object_type": "serving-endpoint",
            "access_control_list": rows}


def _name(who: Caller) -> dict[str, str]:
    key = "user_name" if who.kind == "user" else "service_principal_name"
    return {key: who.name, "display_name": who.name}


def levels_view() -> dict[str, Any]:
    return {"permission_levels": [{"permission_level": level.name, "description": DESCRIPTIONS[level]}
                                  for level in Level]}
