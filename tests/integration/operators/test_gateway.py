"""``@task.ray`` through the cluster's gateway (a connection with ``gateway_url``): real DAG runs (``dag.test()``)
with the Ray XCom backend on the session head, whose gateway the module starts with the deployment's key.

In this process Ray is imported (the session's other tests are drivers); one run goes in a fresh interpreter in
which any import of Ray fails, which is what a deployment's Airflow workers next to a remote cluster look like.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_ray_provider.cluster.gateway_auth import derive_key
from airflow_ray_provider.config import secret_key
from airflow_ray_provider.exceptions import GatewayError
from airflow_ray_provider.local_cluster import free_ports
from airflow_ray_provider.xcom.reference import RayObject, RayObjectDict, RayObjectList, parse_reference
from tests.dags import gateway_dags
from tests.support.dag_runs import GATEWAY_FLOW_PLAIN, run_gateway_flow_without_ray
from tests.support.fixtures import SESSION_HEAD_NAMESPACE
from tests.support.rows import pulled, stored, ti_states, xcom_value

GATEWAY_NAMESPACE = "tests-gateway-dags"  # the gateway actor's own; its calls use the session's owners
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def gateway_url(ray_cluster: str) -> Iterator[str]:
    from airflow_ray_provider.cluster.gateway import GatewayConfig, ensure_gateway, stop_gateway
    from airflow_ray_provider.hooks.ray import RayHook

    RayHook().get_conn()
    # A fixed port, as a deployment's: a gateway Ray restarts listens where it did (test_a_gateway_restarted...).
    host, port, _ = ensure_gateway(GatewayConfig(derive_key(secret_key()), port=free_ports(1)[0]),
                                   namespace=GATEWAY_NAMESPACE)
    try:
        yield f"http://{host}:{port}"
    finally:
        RayHook().get_conn()
        stop_gateway(GATEWAY_NAMESPACE)


@pytest.fixture
def gateway_conn(gateway_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``ray_gateway``: the session head's namespace, reached only through the gateway (no address: nothing to
    join as a driver)."""
    conn = {"conn_type": "ray", "extra": {"gateway_url": gateway_url, "namespace": SESSION_HEAD_NAMESPACE}}
    env = {f"AIRFLOW_CONN_{gateway_dags.CONN.upper()}": json.dumps(conn)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _log(capfd: pytest.CaptureFixture[str]) -> str:
    out = capfd.readouterr()
    return out.out + out.err


@pytest.mark.usefixtures("gateway_conn")
def test_results_flow_by_key_through_the_gateway(capfd: pytest.CaptureFixture[str]) -> None:
    dr = gateway_dags.gateway_flow_dag.test()
    log = _log(capfd)
    states = ti_states(dr)
    assert states and all(s == "success" for s in states.values()), (states, log[-4000:])
    assert "[ray] gateway-make 100 rows" in log  # the worker's output, relayed by the gateway's polls
    made = parse_reference(stored(dr.dag_id, dr.run_id, "make", key="rows"))
    assert isinstance(made, RayObject) and made.location.conn_id == gateway_dags.CONN, made
    assert isinstance(parse_reference(stored(dr.dag_id, dr.run_id, "make")), RayObjectDict)
    # split for the mapped task: one object per item
    assert isinstance(parse_reference(stored(dr.dag_id, dr.run_id, "numbers")), RayObjectList)
    assert xcom_value(dr, "plain") == GATEWAY_FLOW_PLAIN
    assert "Deferring: the triggerer watches Ray task gateway_flow.later" in log
    assert parse_reference(stored(dr.dag_id, dr.run_id, "later")).checkpoint is not None  # written by the worker


@pytest.mark.usefixtures("gateway_conn")
def test_a_failure_and_an_impossible_request_are_named(capfd: pytest.CaptureFixture[str]) -> None:
    dr = gateway_dags.gateway_failure_dag.test()
    log = _log(capfd)
    assert ti_states(dr) == {("explode", -1): "failed", ("skip_me", -1): "skipped"}
    assert "[ray] gateway about to fail" in log
    assert "ValueError: the user's gateway message 7" in log
    assert "Ray task gateway_failure.explode failed" in log

    dr = gateway_dags.gateway_infeasible_dag.test()
    log = _log(capfd)
    assert ti_states(dr) == {("too_big", -1): "failed"}
    assert "can never run on the Ray cluster behind the gateway" in log and "GPU=64" in log, log[-3000:]


def test_an_airflow_process_without_ray_runs_the_dag(gateway_conn: dict[str, str]) -> None:
    """The whole DAG in an interpreter where ``import ray`` fails: the Airflow side needs no Ray at all."""
    out = run_gateway_flow_without_ray(gateway_conn)
    assert out == {"states": ["success"], "plain": GATEWAY_FLOW_PLAIN, "ray_loaded": []}, out


def test_the_test_button_asks_the_gateway_and_starts_nothing(gateway_url: str, connection: Any) -> None:
    """The Test button through a gateway: its answer, and for a gateway that does not answer, what would start it."""
    from airflow_ray_provider.hooks.ray import RayHook

    connection("gw_test", extra={"gateway_url": gateway_url})
    ok, message = RayHook("gw_test").test_connection()
    assert ok and message.startswith(f"Connected through the gateway at {gateway_url}: Ray "), message
    assert "1 node(s)" in message, message

    (silent,) = free_ports(1)  # nothing listens there
    connection("gw_test", extra={"gateway_url": f"http://127.0.0.1:{silent}"})
    ok, message = RayHook("gw_test").test_connection()
    assert not ok and f"127.0.0.1:{silent} does not answer" in message and "dashboard_url" in message, message
    (no_dashboard,) = free_ports(1)
    connection("gw_test", extra={"gateway_url": f"http://127.0.0.1:{silent}",
                                 "dashboard_url": f"http://127.0.0.1:{no_dashboard}"})
    ok, message = RayHook("gw_test").test_connection()
    assert not ok and f"Ray dashboard at http://127.0.0.1:{no_dashboard} did not answer" in message, message


def test_gc_and_the_ray_tab_ask_the_owners_through_the_gateway(gateway_url: str, connection: Any) -> None:
    """Garbage collection and the Ray tab's inspection list and release keys over the gateway (an owner namespace
    of their own: gc with no grace would release other tests' results between their end and their XCom row)."""
    import cloudpickle

    from airflow_ray_provider.gateway_client import GatewayClient
    from airflow_ray_provider.ui.inspect import held_id, inspect
    from airflow_ray_provider.xcom.retention import collect_garbage

    namespace, key = "tests-gateway-gc", f"gw-gc/{uuid.uuid4().hex}"
    connection("gw_gc", extra={"gateway_url": gateway_url, "namespace": namespace})
    with GatewayClient(gateway_url, derive_key(secret_key())) as client:
        client.submit(key, namespace, 0, (cloudpickle.dumps(lambda: [1, 2, 3]), (), {}), {"num_cpus": 0}, lease_s=60)
        deadline = time.monotonic() + 180
        while client.poll(key, namespace, 0, wait=5)["state"] == "running":
            assert time.monotonic() < deadline, f"{key} still running"
        seen = inspect("gw_gc", [{"namespace": namespace, "owner": 0, "key": key}], release=False)
        assert seen.error is None and seen.held[held_id(namespace, 0, key)]["state"] == "finished", seen
        assert seen.store_used_bytes is None  # not asked through the gateway
        dry = collect_garbage(conn_id="gw_gc", grace_s=0, dry_run=True)
        assert key in dry.released and key in client.inventory(namespace, 0)  # a dry run releases nothing
        done = collect_garbage(conn_id="gw_gc", grace_s=0)
        assert key in done.released and key not in client.inventory(namespace, 0)


@pytest.mark.usefixtures("gateway_conn")
def test_a_gateway_restarted_mid_run_loses_nothing(gateway_url: str, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """The gateway's actor is killed while a task polls it; Ray restarts it on the same port, the task's polls are
    asked again meanwhile, and the Ray task, held by its owner, runs once and its result arrives."""
    import ray

    from airflow_ray_provider.cluster.gateway import GATEWAY_NAME
    from airflow_ray_provider.gateway_client import GatewayClient

    restarted: list[str] = []

    def restart_once_started() -> None:
        deadline = time.monotonic() + 240
        while not (tmp_path / "runs").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(ray.get_actor(GATEWAY_NAME, namespace=GATEWAY_NAMESPACE), no_restart=False)
        with GatewayClient(gateway_url, derive_key(secret_key()), timeout=5) as client:
            while time.monotonic() < deadline:
                try:
                    restarted.append(client.version()["provider"])
                    break
                except GatewayError:
                    time.sleep(0.1)
        (tmp_path / "go").touch()

    helper = threading.Thread(target=restart_once_started, daemon=True)
    helper.start()
    dr = gateway_dags.gateway_restart_dag.test(run_conf={"folder": str(tmp_path)})
    helper.join(timeout=60)
    log = _log(capfd)
    assert restarted, "the gateway did not come back"
    assert ti_states(dr) == {("gated", -1): "success"}, log[-4000:]
    assert pulled(dr, "gated") == 42
    assert (tmp_path / "runs").read_text() == "run\n"  # the body ran once
    assert "The gateway did not answer poll of Ray task gateway_restart.gated" in log
