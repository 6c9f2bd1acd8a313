"""A Ray cluster restarted under Airflow: the connected process survives it, and checkpointed results outlive it.

Each test restarts a head of its own: one behind the same address (a long-lived driver must not die of
Ray's "WrongClusterID"), one embedded head restarted on new ports between a checkpointed upstream and its
consumers (``address local``, as on one machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_ray_provider.xcom.reference import parse_reference
from tests.dags import checkpoint_dags
from tests.support.dag_runs import run_on_embedded_head
from tests.support.rows import stored
from tests.support.s3server import BUCKET

pytestmark = pytest.mark.timeout(600)

# A long-lived driver (``airflow dags test``, a triggerer) connected through RayHook. Commands on stdin:
# "task" connects through the hook, then does what every @task.ray does first (ray.nodes(), in
# check_feasible) and runs a trivial task; it answers ">> ok <cluster id>" or ">> refused <the hook's error>"
# (">> " tells answers from the log lines Airflow's logging also writes to stdout).
_LONG_LIVED_DRIVER = r"""
import statistics, sys, time
import ray
from airflow_ray_provider.hooks.ray import RayHook, _connected
from airflow_ray_provider.exceptions import RayConnectionError

for line in sys.stdin:
    if line.strip() == "cost":
        took = []
        for _ in range(200):
            started = time.perf_counter()
            RayHook("ray_restarting").get_conn()
            took.append(time.perf_counter() - started)
        print(">> cost", statistics.median(took), flush=True)
        continue
    try:
        RayHook("ray_restarting").get_conn()
    except RayConnectionError as exc:
        print(">> refused", exc, flush=True)
        continue
    assert [n for n in ray.nodes() if n["Alive"]], "no alive node"
    assert ray.get(ray.remote(lambda: 40 + 2).remote(), timeout=120) == 42
    print(">> ok", _connected["cluster_id"], flush=True)
"""


def test_a_cluster_restarted_behind_the_same_address_never_kills_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cluster behind host:port restarts under a connected process. Before the check, the next task's
    ray.nodes() died in Ray's C++ core ("WrongClusterID"), exiting the process with no Python error, and an
    outage over 60 s ended the process even while idle. Now a task fails naming the cluster while nothing
    answers, the process outlives the outage, and the next task reconnects once a new cluster answers."""
    import queue
    import threading

    from airflow_ray_provider import local_cluster

    cluster = local_cluster.LocalRayCluster(tmp_path / "ray", num_cpus=1)
    state = cluster.ensure_running()
    token = cluster.auth_token() if hasattr(cluster, "auth_token") else None  # token auth, where the head has it
    env = {**os.environ, **getattr(local_cluster, "LOOPBACK_ONLY_ENV", {})}
    env["AIRFLOW_CONN_RAY_RESTARTING"] = json.dumps({
        "conn_type": "ray", "password": token,
        "extra": {"address": state.address, "namespace": "restart", "connect_timeout": 60},
    })
    driver = subprocess.Popen([sys.executable, "-c", _LONG_LIVED_DRIVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    answers: queue.Queue[str] = queue.Queue()
    output: list[str] = []  # everything the driver wrote, for the failure messages

    def _read(stream: Any) -> None:
        for line in stream:
            output.append(line)
            if line.startswith(">> "):
                answers.put(line[3:].strip())

    for stream in (driver.stdout, driver.stderr):
        threading.Thread(target=_read, args=(stream,), daemon=True).start()

    def ask(command: str, timeout: float = 180) -> str:
        try:
            driver.stdin.write(command + "\n")
            driver.stdin.flush()
            return answers.get(timeout=timeout)
        except (queue.Empty, BrokenPipeError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                driver.wait(timeout=5)
            raise AssertionError(f"driver gave no answer to {command!r} (exit code {driver.poll()}): "
                                 f"{''.join(output)[-3000:]}") from None

    real_free_ports = local_cluster.free_ports
    try:
        first = ask("task")
        assert first.startswith("ok "), first
        cost = ask("cost")
        assert float(cost.split()[1]) < 0.05, f"{cost}: the pre-reuse check must stay cheap"

        cluster.stop()
        stopped = time.monotonic()
        down = ask("task")
        assert down.startswith("refused "), down
        assert state.address in down and "does not answer" in down, down
        # Ray ends a driver 60 s into a GCS outage by default (gcs_rpc_server_reconnect_timeout_s), idle or not.
        time.sleep(max(0.0, 65 - (time.monotonic() - stopped)))
        still_down = ask("task")
        assert still_down.startswith("refused "), still_down

        # The same GCS port again: ray start is told it, every other port is free as usual.
        monkeypatch.setattr(local_cluster, "free_ports", lambda n: [state.gcs_port, *real_free_ports(n - 1)])
        restarted = cluster.ensure_running()
        monkeypatch.setattr(local_cluster, "free_ports", real_free_ports)
        assert restarted.address == state.address, restarted

        again = ask("task")
        assert again.startswith("ok "), f"{again}\n{''.join(output)[-3000:]}"
        assert again.split()[1] != first.split()[1], "the new cluster must have a new cluster id"
        assert "changed under this process" in "".join(output)  # the hook's warning on reconnecting
    finally:
        with contextlib.suppress(OSError):
            driver.stdin.close()
        try:
            code = driver.wait(timeout=120)
        except subprocess.TimeoutExpired:
            driver.kill()
            code = driver.wait()
        cluster.stop()
    assert code == 0, f"driver exited with {code}: {''.join(output)[-3000:]}"


@pytest.mark.timeout(900)
def test_cluster_restart_between_upstream_and_downstream(
        tmp_path: Path, airflow_home: Path, airflow_db: Path, s3_endpoint: str,
        ray_connection: Callable[..., Any], capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The whole Ray cluster restarts after the checkpointed upstream; both consumers get equal data."""
    marker = tmp_path / "produce.log"
    ray_connection({"conn_type": "ray", "extra": {"address": "local", "namespace": "ckpt-restart",
                                                   "checkpoint_path": f"s3://{BUCKET}/restart",
                                                   "checkpoint_conn_id": "ckpt_s3"}})
    dr, output, (restart, plain_total, ray_total) = run_on_embedded_head(
        checkpoint_dags.ckpt_restart_dag, {"rows": 2000, "marker": str(marker)}, airflow_home, capfd, caplog,
        pull=("restart_ray", "plain_total", "ray_total"))
    assert marker.read_text().splitlines() == ["produce"]  # the upstream body ran once, before the restart
    before, after = restart.split(" -> ")
    assert before != after  # a new head on a new port: nothing of the old object store survived
    expected_y = sum(i * 0.5 for i in range(2000))
    assert plain_total == pytest.approx(expected_y)
    assert ray_total["y"] == pytest.approx(expected_y) and ray_total["tags"] == ["a", "b"]
    assert ray_total["w"] == pytest.approx(1000.0)
    # The plain consumer read the checkpoint directly; the Ray consumer put it back into the object store.
    assert "reading it from its checkpoint" in output, output[-6000:]
    assert "restoring it from its checkpoint" in output, output[-6000:]
    ref = parse_reference(stored("ckpt_restart", dr.run_id, "produce", key="frame"))
    assert ref.checkpoint is not None and ref.checkpoint["uri"].startswith(f"s3://{BUCKET}/restart/ckpt_restart/")
    assert ref.checkpoint["part"] == 0 and len(ref.checkpoint["sha256"]) == 64
