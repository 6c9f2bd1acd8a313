"""The gateway on the session head: calls, logs, inputs by key, values, cancel and release through HTTP alone,
from processes that cannot import Ray; and what it refuses from a client that does not hold the key.

One gateway for the module (its own actor namespace, its own key), stopped at the end. What is refused before any
owner is reached (malformed, oversized, unsigned) is in tests/unit/cluster/test_gateway_app.py, without a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from airflow_ray_provider.cluster.gateway_api import HeldInput
from airflow_ray_provider.cluster.gateway_auth import derive_key, sign_request
from airflow_ray_provider.exceptions import GatewayAuthError, GatewayError
from airflow_ray_provider.gateway_client import GatewayClient
from tests.support.fixtures import SESSION_HEAD_NAMESPACE

NAMESPACE = SESSION_HEAD_NAMESPACE  # the owners the session's other tests use
GATEWAY_NAMESPACE = "tests-gateway"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gateway(ray_cluster: str) -> Iterator[tuple[str, bytes]]:
    from airflow_ray_provider.cluster.gateway import GatewayConfig, ensure_gateway, stop_gateway
    from airflow_ray_provider.hooks.ray import RayHook

    RayHook().get_conn()
    key = derive_key(os.urandom(32))
    host, port, tls = ensure_gateway(GatewayConfig(key), namespace=GATEWAY_NAMESPACE)
    assert (host, tls) == ("127.0.0.1", False)  # loopback and plain HTTP unless configured otherwise
    try:
        yield f"http://{host}:{port}", key
    finally:
        stop_gateway(GATEWAY_NAMESPACE)


def _wait(client: GatewayClient, key: str, shard: int = 0) -> tuple[dict[str, Any], list[str]]:
    logs: list[str] = []
    offset, deadline = 0, time.monotonic() + 180
    while time.monotonic() < deadline:
        status = client.poll(key, NAMESPACE, shard, offset, wait=5)
        logs += status["logs"]
        offset = status["log_offset"]
        if status["state"] != "running":
            return status, logs
    raise AssertionError(f"{key} still running after 180 s")


def test_a_call_runs_from_a_process_that_cannot_import_ray(gateway: tuple[str, bytes]) -> None:
    """Submit, follow the log, pass a held result to a second call by key, fetch values, release: HTTP only."""
    url, key = gateway
    script = textwrap.dedent("""
        import json, sys, time
        sys.modules["ray"] = None  # any import of Ray fails: this process is not a Ray node or driver
        from airflow_ray_provider.cluster.gateway_api import HeldInput
        from airflow_ray_provider.gateway_client import GatewayClient
        import cloudpickle

        url, key, ns, first, second = sys.argv[1], bytes.fromhex(sys.argv[2]), *sys.argv[3:6]

        def rows(n):
            print(f"making {n} rows", flush=True)
            return [{"i": i, "sq": i * i} for i in range(n)]

        def total(table, scale):
            return sum(r["sq"] for r in table) * scale

        def follow(client, k):
            offset, logs = 0, []
            while True:
                status = client.poll(k, ns, 0, offset, wait=5)
                logs += status["logs"]
                offset = status["log_offset"]
                if status["state"] != "running":
                    return status["state"], logs

        with GatewayClient(url, key) as client:
            out = {"version": client.version()}
            client.submit(first, ns, 0, (cloudpickle.dumps(rows), (1000,), {}), {"num_cpus": 0}, lease_s=60)
            out["first"] = follow(client, first)
            client.submit(second, ns, 0, (cloudpickle.dumps(total), (HeldInput(0, "task 'rows'"),), {"scale": 2}),
                          {"num_cpus": 0}, lease_s=60, inputs=[{"namespace": ns, "shard": 0, "key": first}])
            out["second"] = follow(client, second)
            out["described"] = client.describe(first, ns, 0)
            out["values"] = [client.value(first, ns, 0)[-1], client.value(second, ns, 0)]
            out["released"] = client.release([first, second], ns, 0)
            out["after"] = client.poll(first, ns, 0)["state"]
        print(json.dumps(out))
    """)
    first, second = f"gw/{uuid.uuid4().hex}", f"gw/{uuid.uuid4().hex}"
    proc = subprocess.run([sys.executable, "-c", script, url, key.hex(), NAMESPACE, first, second],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"]["api"] == "v1" and out["version"]["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert out["first"] == ["finished", ["making 1000 rows"]], out
    assert out["second"][0] == "finished", out
    assert out["described"]["meta"]["type"] == "list" and out["described"]["meta"]["length"] == 1000, out
    assert out["values"] == [{"i": 999, "sq": 999 * 999}, 2 * sum(i * i for i in range(1000))]
    assert out["released"] == 2 and out["after"] == "unknown"


def test_a_large_value_is_streamed_in_frames_and_checked(gateway: tuple[str, bytes]) -> None:
    import cloudpickle
    import numpy as np

    url, key = gateway
    run = f"gw/{uuid.uuid4().hex}"
    with GatewayClient(url, key) as client:
        client.submit(run, NAMESPACE, 1, (cloudpickle.dumps(lambda n: np.arange(n, dtype=np.int64)), (3_000_000,),
                                          {}), {"num_cpus": 0}, lease_s=60)
        assert _wait(client, run, 1)[0]["state"] == "finished"
        described = client.describe(run, NAMESPACE, 1)
        assert described["size"] > 20_000_000 and described["node_ids"], described  # in the store, 24 MB
        value = client.value(run, NAMESPACE, 1)  # 6 frames of 4 MiB
        assert value.shape == (3_000_000,) and int(value[-1]) == 2_999_999
        with pytest.raises(GatewayAuthError, match=r"refused GET .* as unauthenticated"):
            GatewayClient(url, derive_key(os.urandom(32))).value(run, NAMESPACE, 1)
        assert client.release([run], NAMESPACE, 1) == 1


def test_a_dict_result_is_split_into_items_read_alone(gateway: tuple[str, bytes]) -> None:
    """What multiple_outputs and mapped tasks need: one object per item, each described and readable alone."""
    import cloudpickle

    url, key = gateway
    run = f"gw/{uuid.uuid4().hex}"
    with GatewayClient(url, key) as client:
        client.submit(run, NAMESPACE, 0, (cloudpickle.dumps(lambda: {"rows": [1, 2, 3], "total": 6}), (), {}),
                      {"num_cpus": 0}, lease_s=60)
        assert _wait(client, run)[0]["state"] == "finished"
        items = client.split(run, NAMESPACE, 0, ["rows", "total"])
        assert [item["key"] for item in items] == [f"{run}#0", f"{run}#1"]
        assert items[0]["meta"]["summary"] == "list of 3 items of int", items
        assert client.value(f"{run}#1", NAMESPACE, 0) == 6
        assert client.poll(run, NAMESPACE, 0)["state"] == "unknown"  # the whole is released once split
        assert client.release([f"{run}#0", f"{run}#1"], NAMESPACE, 0) == 2


def test_a_failed_call_says_why_and_has_no_value(gateway: tuple[str, bytes]) -> None:
    import cloudpickle

    url, key = gateway
    run = f"gw/{uuid.uuid4().hex}"

    def fails() -> None:
        raise ValueError("no rows for 2026-12-07")

    with GatewayClient(url, key) as client:
        client.submit(run, NAMESPACE, 0, (cloudpickle.dumps(fails), (), {}), {"num_cpus": 0, "max_retries": 0},
                      lease_s=60)
        status, _ = _wait(client, run)
        assert status["state"] == "failed" and "no rows for 2026-12-07" in status["error"]
        with pytest.raises(GatewayError, match=r"\(409\).*failed") as refused:
            client.value(run, NAMESPACE, 0)
        assert refused.value.status == 409
        with pytest.raises(GatewayError, match=r"\(409\).*already in use"):
            client.submit(run, NAMESPACE, 0, (cloudpickle.dumps(fails), (), {}), {"num_cpus": 0}, lease_s=60)
        with pytest.raises(GatewayError, match=r"\(409\).*input 0 .*is gone"):
            client.submit(f"gw/{uuid.uuid4().hex}", NAMESPACE, 0, (cloudpickle.dumps(len), (HeldInput(0, "x"),), {}),
                          {"num_cpus": 0}, lease_s=60,
                          inputs=[{"namespace": NAMESPACE, "shard": 0, "key": "gw/never-made"}])
        with pytest.raises(GatewayError, match=r"\(400\).*bogus_option"):
            client.submit(f"gw/{uuid.uuid4().hex}", NAMESPACE, 0, (cloudpickle.dumps(fails), (), {}),
                          {"bogus_option": 1}, lease_s=60)
        client.release([run], NAMESPACE, 0)


def test_cancel_ends_a_running_call(gateway: tuple[str, bytes]) -> None:
    import cloudpickle

    url, key = gateway
    run = f"gw/{uuid.uuid4().hex}"

    def slow() -> None:
        print("started", flush=True)
        time.sleep(600)

    with GatewayClient(url, key) as client:
        client.submit(run, NAMESPACE, 0, (cloudpickle.dumps(slow), (), {}), {"num_cpus": 0}, lease_s=120)
        offset, deadline = 0, time.monotonic() + 120
        while time.monotonic() < deadline:  # until the worker has started the callable
            status = client.poll(run, NAMESPACE, 0, offset, wait=5)
            if "started" in status["logs"]:
                break
            offset = status["log_offset"]
        assert client.cancel(run, NAMESPACE, 0) is True
        assert client.poll(run, NAMESPACE, 0)["state"] == "cancelled"
        client.release([run], NAMESPACE, 0)


def test_a_request_without_the_key_runs_nothing(gateway: tuple[str, bytes], tmp_path: Any) -> None:
    """Unsigned, signed with another key, replayed, altered or stale: 401, unsigned, and the call never exists."""
    import base64

    import cloudpickle

    url, key = gateway
    marker = tmp_path / "ran"
    run = f"gw/{uuid.uuid4().hex}"
    body = json.dumps({"key": run, "namespace": NAMESPACE, "shard": 0, "options": {"num_cpus": 0}, "lease_s": 60,
                       "hold_s": 0, "inputs": [], "payload": base64.b64encode(cloudpickle.dumps(
                           (cloudpickle.dumps(marker.touch), (), {}))).decode()}).encode()
    path = "/v1/calls"
    good = sign_request(key, "POST", path, body=body)
    attempts = {
        "unsigned": ({}, body),
        "another key": (sign_request(derive_key(os.urandom(32)), "POST", path, body=body), body),
        "altered body": (good, body.replace(b'"lease_s": 60', b'"lease_s": 61')),
        "stale": (sign_request(key, "POST", path, body=body, now=time.time() - 600), body),
    }
    with httpx.Client() as http:
        for why, (headers, sent) in attempts.items():
            answer = http.post(f"{url}{path}", content=sent, headers=headers)
            assert answer.status_code == 401, (why, answer.text)
            assert "X-Airflow-Ray-Signature" not in answer.headers or why == "altered body", why
        # The altered body was refused after its headers passed, so that nonce is spent: a replay of the
        # genuine request is refused too, whole.
        replay = http.post(f"{url}{path}", content=body, headers=good)
        assert replay.status_code == 401 and "reuses a nonce" in replay.json()["error"], replay.text
    with GatewayClient(url, key) as client:
        assert client.poll(run, NAMESPACE, 0)["state"] == "unknown"
    assert not marker.exists()
