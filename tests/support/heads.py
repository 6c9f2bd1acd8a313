"""Helpers for tests of Ray heads: heads from another virtualenv (a stock-Ray one, another Ray/Python version),
file modes, and forged state files."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_ray_provider.local_cluster import LocalRayCluster, free_ports


def file_mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def head_start_logs(cluster: LocalRayCluster, lines: int = 40) -> str:
    """The tails of a head's start log and of its last session's GCS and raylet logs, for a failure message (the
    head's temp folder is gone by the time CI shows one)."""
    sessions = sorted(cluster.ray_temp_dir.glob("session_2*"), key=lambda p: p.stat().st_mtime)
    paths = [cluster.log_file]
    if sessions:
        paths += [sessions[-1] / "logs" / name for name in ("gcs_server.out", "gcs_server.err", "raylet.out",
                                                             "raylet.err")]
    return "".join(f"\n--- {path} (last {lines} lines)\n" + "\n".join(
        path.read_text(errors="replace").splitlines()[-lines:]) for path in paths if path.exists())


def forge_state(cluster: LocalRayCluster, pid: int, **fields: object) -> None:
    """A state file naming ``pid`` as the head's session, as an older version (or an attacker) would write it."""
    cluster.home.mkdir(parents=True, exist_ok=True)
    (gcs_port,) = free_ports(1)
    state = {"address": f"127.0.0.1:{gcs_port}", "gcs_port": gcs_port, "session_id": pid,
             "temp_dir": str(cluster.temp_dir), "dashboard_url": None, "started_at": 1.0, "version": 1, **fields}
    cluster.state_file.write_text(json.dumps(state))


@contextlib.contextmanager
def head_from(venv: Path, home: Path, build_hint: str, num_cpus: int,
              include_dashboard: bool = False) -> Iterator[tuple[Any, Any]]:
    """``(cluster, state)`` of a head started with ``venv``'s ``ray``; skips, saying how to build it, if absent."""
    ray_command = venv / "bin" / "ray"
    if not ray_command.exists():
        pytest.skip(f"no virtualenv at {venv} ({build_hint})")
    cluster = LocalRayCluster(home, num_cpus=num_cpus, ray_command=str(ray_command),
                              include_dashboard=include_dashboard)
    state = cluster.ensure_running()
    try:
        yield cluster, state
    finally:
        cluster.stop()
