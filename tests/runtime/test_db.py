"""Migrations: applied in order, once, recorded; a broken one leaves nothing."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from runtime import db
from runtime.settings import Settings


async def test_migrations_are_recorded_and_not_applied_twice(settings: Settings) -> None:
    conn = await db.connect(settings.database_url or "")
    try:
        names = [m.name for m in db.load_migrations()]
        recorded = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")]
        assert recorded == names
        assert await db.migrate(conn) == []
    finally:
        await conn.close()


async def test_failing_migration_is_rolled_back(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a_ok (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE b_half (id int); SELECT no_such_column FROM a_ok;")
    conn = await db.connect(settings.database_url or "")
    try:
        await conn.execute("DROP TABLE schema_migrations")
        with pytest.raises(asyncpg.PostgresError):
            await db.migrate(conn, tmp_path)
        assert await conn.fetchval("SELECT to_regclass('b_half')") is None
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 1
    finally:
        await conn.close()


def test_duplicate_migration_numbers_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("")
    (tmp_path / "0001_b.sql").write_text("")
    with pytest.raises(ValueError, match="two migrations numbered 0001"):
        db.load_migrations(tmp_path)
