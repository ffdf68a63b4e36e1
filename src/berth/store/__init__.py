"""Durable state: endpoints, tokens and replica records, behind one `Store` (SQLAlchemy)."""

from berth.store.db import EndpointRecord, ReplicaRecord, Store

__all__ = ["EndpointRecord", "ReplicaRecord", "Store"]
