"""The embedded Ray head: one per home, safe under concurrent first callers, stoppable on its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_ray_provider.local_cluster import LocalClusterError, LocalRayCluster, port_open


def _count(cluster: LocalRayCluster, name: str, session_id: int) -> int:
    return sum(p.name() == name for p in cluster._session_processes(session_id))


def test_concurrent_first_callers_start_exactly_one_head(tmp_path: Path) -> None:
    home = tmp_path / "ray"
    code = ("import sys; from airflow_ray_provider.local_cluster import LocalRayCluster; "
            "print(LocalRayCluster(sys.argv[1], num_cpus=1).ensure_running().address)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    cluster = LocalRayCluster(home)
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
        addresses = {out.strip() for out, _ in outputs}
        assert len(addresses) == 1, addresses
        state = cluster.status()
        assert state is not None and state.address in addresses
        assert state.gcs_port != 6379
        assert _count(cluster, "gcs_server", state.session_id) == 1
        assert _count(cluster, "raylet", state.session_id) == 1
        # No process of the head is told one of Ray's fixed default ports (other services hold them).
        fixed = re.compile(r"(?:port|address)[=:](?:\S*:)?(6379|8265|10001|52365)\b")
        told = [" ".join(p.cmdline()) for p in cluster._session_processes(state.session_id)]
        assert not [c for c in told if fixed.search(c)], [c for c in told if fixed.search(c)]
        # The head is not tied to the processes that started it: they have all exited.
        assert port_open("127.0.0.1", state.gcs_port)
    finally:
        assert cluster.stop()
    assert cluster.status() is None
    assert not port_open("127.0.0.1", state.gcs_port)


def test_cli_start_status_stop(tmp_path: Path) -> None:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    cli = [sys.executable, "-m", "airflow_ray_provider.cli", "local"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=240)

    assert run("status").returncode == 3
    started = run("start", "--num-cpus", "1", "--json")
    try:
        assert started.returncode == 0, started.stderr
        state = json.loads(started.stdout)
        status = run("status")
        assert status.returncode == 0 and state["address"] in status.stdout
        assert f"Ray Client: {state['client_address']}" in status.stdout
        assert state["client_address"].startswith("ray://127.0.0.1:")
        assert (tmp_path / "ray" / "local-cluster.json").exists()
    finally:
        stopped = run("stop")
    assert stopped.stdout.strip() == "stopped"
    assert run("status").stdout.strip() == "not running"


def test_a_saved_ray_token_does_not_lock_the_provider_out_of_its_embedded_head(tmp_path: Path) -> None:
    """Any earlier ``ray.init()`` writes ``~/.ray/auth_token``; ``ray start`` then turns token auth on unless
    told otherwise, and a client without the token was refused. The embedded head stays reachable."""
    home = tmp_path / "user"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a" * 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), AIRFLOW_HOME=str(tmp_path / "airflow"))
    env.pop("AIRFLOW_CONN_RAY_DEFAULT", None)  # no connection: the embedded head
    code = ("import ray; from airflow_ray_provider.hooks import RayHook; RayHook().get_conn(); "
            "print('sum', ray.get(ray.remote(lambda: 40 + 2).remote()))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    finally:
        LocalRayCluster(tmp_path / "airflow" / "ray").stop()
    assert proc.returncode == 0 and "sum 42" in proc.stdout, proc.stderr[-3000:]


def test_malformed_state_file_is_refused(tmp_path: Path) -> None:
    cluster = LocalRayCluster(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    cluster.state_file.write_text(json.dumps({"address": "x", "gcs_port": "not-a-port"}))
    with pytest.raises(LocalClusterError, match="Malformed state file"):
        cluster.read_state()
    cluster.state_file.write_text("{not json")
    with pytest.raises(LocalClusterError, match="Unreadable state file"):
        cluster.read_state()
