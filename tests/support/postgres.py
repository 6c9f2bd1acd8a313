"""The machine's PostgreSQL (127.0.0.1:5432, trust auth, as on these machines and in CI)."""

from __future__ import annotations

from typing import Any

HOST, PORT, USER = "127.0.0.1", 5432, "postgres"
ADMIN_DB = "test"


def connect(dbname: str = ADMIN_DB) -> Any:
    import psycopg2

    conn = psycopg2.connect(host=HOST, port=PORT, user=USER, dbname=dbname, connect_timeout=5)
    conn.autocommit = True
    return conn


def unavailable() -> str | None:
    """Why PostgreSQL cannot be used here, or None."""
    import psycopg2

    try:
        connect().close()
    except psycopg2.OperationalError as exc:
        return f"PostgreSQL not reachable at {HOST}:{PORT}: {str(exc).strip()}"
    return None


def url(dbname: str, server: str = f"{USER}@{HOST}:{PORT}") -> str:
    return f"postgresql+psycopg2://{server}/{dbname}"


def create(name: str, template: str | None = None) -> None:
    admin = connect()
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        admin.close()


def drop(name: str) -> None:
    admin = connect()
    try:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def query(dbname: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()
