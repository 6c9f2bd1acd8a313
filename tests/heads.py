"""Ray heads started from another virtualenv (a stock-Ray one, another Ray/Python version)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@contextlib.contextmanager
def head_from(venv: Path, home: Path, build_hint: str, num_cpus: int) -> Iterator[tuple[Any, Any]]:
    """``(cluster, state)`` of a head started with ``venv``'s ``ray``; skips, saying how to build it, if absent."""
    from airflow_ray_provider.local_cluster import LocalRayCluster

    ray_command = venv / "bin" / "ray"
    if not ray_command.exists():
        pytest.skip(f"no virtualenv at {venv} ({build_hint})")
    cluster = LocalRayCluster(home, num_cpus=num_cpus, ray_command=str(ray_command))
    state = cluster.ensure_running()
    try:
        yield cluster, state
    finally:
        cluster.stop()
