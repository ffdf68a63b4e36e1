"""Durable state: endpoints, tokens and replica records, behind one `Store` (SQLAlchemy)."""

from berth.store.db import EndpointRecord, ReplicaRecord, Store
from berth.store.engine import StoreError

__all__ = ["EndpointRecord", "ReplicaRecord", "Store", "StoreError"]
