"""Where replicas run. The gateway and reconciler see only `Backend`: ids and addresses."""

from berth.backends.base import Backend, ReplicaExit, ReplicaHandle, ReplicaSpec

__all__ = ["Backend", "ReplicaExit", "ReplicaHandle", "ReplicaSpec"]
