"""How owner actors are named and which one holds a key: shared by the cluster side and by Airflow processes that
reach the cluster only through the gateway, so it imports neither Ray nor Airflow."""

from __future__ import annotations

import zlib

OWNER_NAME_PREFIX = "airflow-ray-owner"
# A poll from this log offset returns the run's state and no lines (TaskOwner.poll).
STATE_ONLY_OFFSET = 10**12


def shard_for(key: str, shards: int) -> int:
    return zlib.crc32(key.encode()) % max(1, shards)


def owner_name(shard: int) -> str:
    return f"{OWNER_NAME_PREFIX}-{shard}"


def owner_label(namespace: str, shard: int) -> str:
    """How errors and logs name an owner actor: its Ray actor name and namespace."""
    return f"owner actor {owner_name(shard)!r} (namespace {namespace!r})"
