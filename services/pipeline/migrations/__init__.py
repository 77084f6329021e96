"""Ordered SQL migrations (`NNNN_name.sql` beside this file) and the `migrate` step.

Contract: `migrate(url)` applies, in file-name order and each in its own
transaction, every migration not yet recorded in `schema_migrations`, under an
advisory lock so concurrent runs do not race; it returns the names applied.
Running it again applies nothing.
"""

from __future__ import annotations

from importlib import resources

import psycopg

_LOCK_KEY = 0x6D61696C  # "mail"


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every migration, in order."""
    files = [
        f for f in resources.files(__name__).iterdir() if f.name.endswith(".sql")
    ]
    return [(f.name, f.read_text(encoding="utf-8")) for f in sorted(files, key=lambda f: f.name)]


def migrate(url: str) -> list[str]:
    """Apply pending migrations to the database at `url`."""
    applied: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for name, sql in migration_files():
                if name in done:
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied
