"""The ``ray`` connection: parsing, the provider registration, the UI's Test button."""

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

from airflow_ray_provider.exceptions import RayConnectionError
from airflow_ray_provider.hooks.settings import RaySettings, merge_runtime_env, parse_address


@pytest.mark.parametrize(
    ("raw", "kind", "text"),
    [
        ("", "local", "local"),
        ("local", "local", "local"),
        ("auto", "auto", "auto"),
        ("10.1.2.3:6380", "gcs", "10.1.2.3:6380"),
        ("raycluster-head-svc.ray.svc.cluster.local:6379", "gcs", "raycluster-head-svc.ray.svc.cluster.local:6379"),
        ("ray://head:10001", "client", "ray://head:10001"),
        ("[::1]:6380", "gcs", "::1:6380"),
    ],
)
def test_address_forms(raw: str, kind: str, text: str) -> None:
    address = parse_address(raw)
    assert address.kind == kind
    assert str(address).replace("[", "").replace("]", "") == text


def test_an_ipv6_address_prints_in_the_form_it_parses_from() -> None:
    assert str(parse_address("[::1]:6380")) == "[::1]:6380"
    assert parse_address(str(parse_address("ray://[fd00::2]:10001"))) == parse_address("ray://[fd00::2]:10001")


@pytest.mark.parametrize("raw", ["http://head:8265", "head", "head:port", "head:99999", "ray://", ":123"])
def test_malformed_addresses_name_the_input(raw: str) -> None:
    with pytest.raises(RayConnectionError, match="Malformed Ray address") as info:
        parse_address(raw)
    assert repr(raw) in str(info.value)


def test_settings_from_connection_fields() -> None:
    settings = RaySettings.from_fields(
        host="head", port=6380, password="s3cret",
        extra={"namespace": "team-a", "runtime_env": '{"env_vars": {"A": "1"}}', "lease_timeout": "30"},
    )
    assert str(settings.address) == "head:6380"
    assert settings.namespace == "team-a"
    assert settings.runtime_env == {"env_vars": {"A": "1"}}
    assert settings.lease_timeout == 30.0
    assert "s3cret" not in repr(settings)  # the token never shows in logs or reprs
    assert str(RaySettings.from_fields(extra={"address": "ray://h:10001"}).address) == "ray://h:10001"
    assert RaySettings.from_fields().address.kind == "local"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"runtime_env": "{oops"}, "'runtime_env' is not valid JSON"),
        ({"runtime_env": [1]}, "'runtime_env' must be a JSON object"),
        ({"lease_timeout": "soon"}, "'lease_timeout' must be a number"),
        ({"lease_timeout": 1}, "'lease_timeout' must be at least 5"),
        ({"namespace": "a/b"}, "'namespace' has odd characters"),
    ],
)
def test_bad_connection_fields_are_named(extra: dict, message: str) -> None:
    with pytest.raises(RayConnectionError, match=message):
        RaySettings.from_fields(extra=extra)


def test_task_runtime_env_merges_over_the_default() -> None:
    base = {"env_vars": {"A": "1", "B": "1"}, "pip": ["x"]}
    assert merge_runtime_env(base, {"env_vars": {"B": "2"}, "pip": ["y"]}) == {
        "env_vars": {"A": "1", "B": "2"}, "pip": ["y"],
    }
    assert merge_runtime_env(base, None) == base


def test_provider_is_registered_with_airflow() -> None:
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk import task

    manager = ProvidersManager()
    assert "airflow-ray-provider" in manager.providers
    hook = manager.hooks["ray"]
    assert hook is not None and hook.hook_class_name == "airflow_ray_provider.hooks.ray.RayHook"
    assert callable(task.ray)
    listed = subprocess.run([sys.executable, "-m", "airflow", "providers", "list"], capture_output=True, text=True,
                            timeout=120, env=os.environ.copy())
    assert "airflow-ray-provider" in listed.stdout, listed.stderr[-2000:]


def test_connection_fields_are_declared_the_airflow_3_way() -> None:
    from airflow_ray_provider.get_provider_info import get_provider_info
    from airflow_ray_provider.hooks.ray import RayHook

    conn_type = get_provider_info()["connection-types"][0]
    assert conn_type["connection-type"] == "ray"
    assert {"address", "namespace", "runtime_env"} <= set(conn_type["conn-fields"])
    assert conn_type["ui-field-behaviour"]["relabeling"]["password"] == "Ray auth token"
    assert not hasattr(RayHook, "get_connection_form_widgets") or RayHook.get_connection_form_widgets() == {}


def test_test_connection_button(ray_cluster: str, connection) -> None:
    from airflow_ray_provider.hooks.ray import RayHook
    from airflow_ray_provider.local_cluster import free_ports

    ok, message = RayHook().test_connection()
    assert ok, message
    assert message.startswith("Connected to Ray 2.") and "1 node(s), 4 CPU" in message
    (port,) = free_ports(1)
    ok, message = RayHook(connection("ray_closed", extra={"address": f"127.0.0.1:{port}"})).test_connection()
    assert not ok
    assert f"127.0.0.1:{port}" in message
    ok, message = RayHook(connection("ray_garbled", extra={"address": "http://x:1"})).test_connection()
    assert not ok and "Malformed Ray address 'http://x:1'" in message


def test_a_second_connection_with_another_identity_is_refused(ray_cluster: str, connection) -> None:
    """One process holds one Ray connection: another token, namespace or address is an error naming both
    connections, never a silent reuse of the first (which would run the task under the first's identity)."""
    import ray

    from airflow_ray_provider.hooks.ray import RayHook

    RayHook().get_conn()  # ray_default: the session cluster, namespace "tests"
    default_token = RayHook().settings.auth_token
    other_token = "other-token-" + "7" * 40

    connection("ray_other_token", password=other_token, extra={"address": ray_cluster, "namespace": "tests"})
    with pytest.raises(RayConnectionError) as info:
        RayHook("ray_other_token").get_conn()
    message = str(info.value)
    assert "'ray_other_token'" in message and "'ray_default'" in message, message
    assert "the auth token" in message and ray_cluster in message, message
    assert other_token not in message and (default_token is None or default_token not in message), message

    connection("ray_other_ns", password=default_token, extra={"address": ray_cluster, "namespace": "elsewhere"})
    with pytest.raises(RayConnectionError, match=r"namespace \(tests in use, elsewhere asked\)") as info:
        RayHook("ray_other_ns").get_conn()
    assert "'ray_other_ns'" in str(info.value) and "auth token" not in str(info.value)

    # The same cluster under another spelling is still another address: it is not silently taken as equal.
    other_address = ray_cluster.replace("127.0.0.1", "localhost")
    connection("ray_other_address", password=default_token, extra={"address": other_address, "namespace": "tests"})
    with pytest.raises(RayConnectionError, match=rf"cluster address \({ray_cluster} in use, {other_address} asked\)"):
        RayHook("ray_other_address").get_conn()

    # The same identity under another connection id is the same connection: reused.
    connection("ray_same", password=default_token, extra={"address": ray_cluster, "namespace": "tests"})
    assert RayHook("ray_same").get_conn() is ray
    assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42  # the connection still works after the refusals


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
