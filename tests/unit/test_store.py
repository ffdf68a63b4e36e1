"""The embedded SQLite store's connection settings: WAL journal, `synchronous=NORMAL` (no fsync per
commit on the event loop; in WAL mode a crash never corrupts, only a power cut may lose the last
commits), a busy timeout for the other processes' writes."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from berth.store import Store


def test_every_connection_gets_wal_normal_sync_and_a_busy_timeout(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'berth.db'}")
    try:
        with store.engine.connect() as conn:
            pragma = {name: conn.execute(sa.text(f"PRAGMA {name}")).scalar()
                      for name in ("journal_mode", "synchronous", "busy_timeout")}
        assert pragma == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 5000}  # 1: NORMAL (FULL is 2)
    finally:
        store.close()
