"""A Ray cluster restarted behind the same address under a connected process: the process survives it.

The test restarts a head of its own (a long-lived driver must not die of Ray's "WrongClusterID"). An embedded
head restarted on new ports between a checkpointed upstream and its consumers is the fault-tolerance example's
test (tests/system/test_example_dags.py), which took over what this module's second test checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

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
