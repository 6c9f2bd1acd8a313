"""docker-compose.yaml's topology as real hosts: Linux namespaces joined by veth pairs (scripts/netns_topology.py).

It also holds what the same topology on loopback once checked on its own (CeleryExecutor with two workers,
two Ray nodes, S3 checkpoints): the basics example fanned out over both workers, and the shared array's
XCom row a signed reference naming the node that made it.

An airflow host (api-server, scheduler, dag-processor, two Celery workers, Redis, PostgreSQL and a
zero-CPU Ray node for the workers' drivers), a Ray head host, a Ray worker host and an S3 host
(SeaweedFS), each with its own address on 10.213.77.0/24, its own PID namespace and its own disk
view; the test itself talks to them from a client namespace. ``example_ray_two_nodes`` runs through
the REST API, and the worker host dies (every process at once) while the run waits for it to.

Loopback in a namespace reaches only that namespace, and every service binds its host's 10.x
address, so the run succeeding already shows nobody used 127.0.0.1 for a service; the test also
checks the configured addresses, the addresses of the Ray nodes, and the TCP connections it saw.
Each host sees an empty tmpfs where the other hosts' directories are, so nothing can pass through a
shared disk either.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest

from airflow_ray_provider.xcom.reference import parse_reference
from scripts.local_topology import ROOT, Component, TopologyError, celery_airflow, wait_until
from scripts.netns_topology import (
    API_PORT,
    BUCKET,
    GCS_PORT,
    HOST_NUMBERS,
    OBJECT_MANAGER_PORT,
    PG_PORT,
    PG_USER,
    PREFIX_LEN,
    REDIS_PORT,
    S3_ACCESS_KEY,
    S3_PORT,
    SERVICE_HOSTS,
    SUBNET,
    ClientApi,
    ClientNet,
    Host,
    Network,
    Wiretap,
    migrate,
    missing_tools,
    pg_query,
    ray_nodes_from,
    reachable,
    s3_keys,
    start_airflow,
    start_postgres,
    start_ray,
    start_redis,
    start_seaweedfs,
    stop_hosts,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(1500)]
TIMEOUT_S = 480.0
DAG_ID = "example_ray_two_nodes"
BASICS = "example_ray_basics"  # fanned out over both Celery workers and both Ray nodes
DB = "airflow"


def test_two_nodes_on_separate_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces (ip netns, veth pairs) and PID/mount namespaces need root")
    missing = missing_tools()
    if missing:
        pytest.skip(f"the namespace topology needs {', '.join(missing)}, not found on this machine")
    if ROOT.is_relative_to("/tmp"):
        # Each host gets a fresh tmpfs on /tmp, which would hide the checkout (code and venv) it is given read-only.
        pytest.skip(f"the checkout {ROOT} is under /tmp, which every host of the topology sees as an empty tmpfs; "
                    "run the suite from a clone outside /tmp")
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(name, raising=False)

    network = Network()
    base = Path("/var/tmp") / network.prefix  # short (Ray's socket paths stay < 108 chars), outside /tmp
    hosts: dict[str, Host] = {}
    components: list[Component] = []
    net: ClientNet | None = None
    tap: Wiretap | None = None
    airflow = None
    try:
        try:
            network.create()
        except TopologyError as exc:
            pytest.skip(f"cannot create network namespaces and veth pairs here: {exc}")
        base.mkdir(mode=0o755)
        disks = {name: base / name for name in SERVICE_HOSTS}
        for name in SERVICE_HOSTS:
            hosts[name] = Host(name, network.netns(name), network.address(name), disks[name])
            try:
                hosts[name].boot([d for other, d in disks.items() if other != name])
            except TopologyError as exc:
                pytest.skip(f"cannot create the PID, UTS and mount namespaces of a host here: {exc}")
        af, head, worker, s3 = (hosts[n] for n in SERVICE_HOSTS)
        net = ClientNet(network.netns("client"))
        tap = Wiretap(network, hosts)
        tap.start()

        def diagnostics() -> str:
            parts = [c.tail(40) for c in components]
            if airflow is not None:
                parts.append(airflow.diagnostics())
            for name, host in hosts.items():
                for log in sorted((host.disk / "ray").glob("session_latest/logs/raylet.out"))[:1]:
                    parts.append(f"===== {name} {log.name} =====\n" + "\n".join(
                        log.read_text(errors="replace").splitlines()[-20:]))
            return "\n\n".join(parts)

        def wait(what: str, check: Any, timeout: float, interval: float = 1.0) -> Any:
            return wait_until(what, check, timeout, components, diagnostics, interval)

        token = secrets.token_hex(32)
        # A random secret: Airflow masks a connection's password wherever it appears in task logs.
        s3_secret = secrets.token_hex(16)
        s3_endpoint = f"http://{s3.address}:{S3_PORT}"
        components += [start_redis(af), start_postgres(af, f"{SUBNET}.0/{PREFIX_LEN}"), start_seaweedfs(s3, s3_secret)]
        # One Ray node after the other, before the migration: each raylet has 30 s to register.
        components.append(start_ray(head, token, {"head_node": 1}, num_cpus=2, object_store_mb=400))
        components.append(start_ray(worker, token, {"worker_node": 1}, num_cpus=2, object_store_mb=400, head=head))
        # A node without CPUs on the airflow host: a Ray driver attaches to a raylet of its own host (it
        # finds one by listing processes), so an Airflow worker needs one beside it.
        components.append(start_ray(af, token, {"airflow_host": 1}, num_cpus=0, object_store_mb=100, head=head))
        wait("PostgreSQL", lambda: reachable(net, af.address, PG_PORT), 60)
        pg_query(net, af.address, "postgres", f'CREATE DATABASE "{DB}"')

        airflow = celery_airflow(af.disk / "airflow", DB, f"redis://{af.address}:{REDIS_PORT}/0", {
            "address": f"{head.address}:{GCS_PORT}", "namespace": "netns",
            "checkpoint_path": f"s3://{BUCKET}/netns", "checkpoint_conn_id": "ckpt_s3"},
            pg_server=f"{PG_USER}@{af.address}:{PG_PORT}", ray_password=token)
        airflow.port = API_PORT
        airflow.api = ClientApi(f"http://{af.address}:{API_PORT}", airflow.diagnostics, net)
        airflow.extra_env.update({
            "HOME": str(af.home),
            "AIRFLOW__API__HOST": af.address,
            "AIRFLOW__API__BASE_URL": f"http://{af.address}:{API_PORT}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{af.address}:{API_PORT}/execution/",
            "AIRFLOW_CONN_CKPT_S3": json.dumps({
                "conn_type": "aws", "login": S3_ACCESS_KEY, "password": s3_secret,
                "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}),
        })
        migrate(airflow, af)

        def three_nodes() -> list[dict[str, Any]] | None:
            try:  # fails while the airflow host's own raylet is not registered yet: its driver has none
                nodes = ray_nodes_from(af, f"{head.address}:{GCS_PORT}", token)
            except TopologyError as exc:
                print(exc)
                return None
            return nodes if len(nodes) == 3 else None

        nodes = wait("three Ray nodes", three_nodes, 240, interval=3)
        node_of = {next(r for r in ("head_node", "worker_node", "airflow_host") if r in n["resources"]): n
                   for n in nodes}
        # Each node advertises its own host's address (a node on loopback could not be reached).
        assert {k: n["ip"] for k, n in node_of.items()} == {
            "head_node": head.address, "worker_node": worker.address, "airflow_host": af.address}

        start_airflow(airflow, af, celery_workers=2)
        wait("S3 on the s3 host", lambda: reachable(net, s3.address, S3_PORT), 60)
        for dag_id in (BASICS, DAG_ID):
            airflow.wait(f"DAG {dag_id} to be parsed", lambda d=dag_id: airflow.api.has_dag(d), 240)
        basics = airflow.api.trigger(BASICS, {"shards": 6, "rows_per_shard": 2000})
        run_id = airflow.api.trigger(DAG_ID, {"mb": 16, "wait_for_node_loss": True, "node_loss_timeout": 300})

        def task_state(task_id: str) -> str | None:
            rows = pg_query(net, af.address, DB, "SELECT state FROM task_instance WHERE dag_id = %s AND run_id = %s "
                            "AND task_id = %s", (DAG_ID, run_id, task_id))
            return rows[0][0] if rows else None

        # produce_kept's checkpointed array lives on the worker host and nobody has read it yet: kill the host.
        airflow.wait("wait_for_node_loss to start", lambda: task_state("wait_for_node_loss") == "running", TIMEOUT_S)
        assert task_state("produce_kept") == "success"
        worker.crash()
        state = airflow.wait(f"run {run_id}", lambda: airflow.api.run_state(DAG_ID, run_id), TIMEOUT_S)
        assert state == "success", airflow.diagnostics()
        basics_state = airflow.wait(f"run {basics}", lambda: airflow.api.run_state(BASICS, basics), TIMEOUT_S)
        assert basics_state == "success", airflow.diagnostics()
        tap.sample()

        # -- what the example documents ---------------------------------------------------------------
        report = airflow.api.ok("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/report/"
                                       "xcomEntries/return_value")["value"]
        report = json.loads(report) if isinstance(report, str) else report
        head_id, worker_id = node_of["head_node"]["id"], node_of["worker_node"]["id"]
        assert report["produced_on"] == worker_id and report["consumed_on"] == head_id, report
        assert report["equal"] is True and report["waited"].startswith("worker node gone after"), report
        # The checkpointed array outlived its host: restored from S3 on the head, not recomputed.
        assert report["kept_consumed_on"] == head_id, report
        tries = dict(pg_query(net, af.address, DB, "SELECT task_id, try_number FROM task_instance "
                              "WHERE dag_id = %s AND run_id = %s", (DAG_ID, run_id)))
        assert tries["produce_kept"] == 1 and tries["consume_kept"] == 1, tries
        # The shared array was made on the worker node and used on the head; the DB holds only its reference,
        # signed with the deployment's [ray] secret_key (which this test process does not have as its own).
        ((array_row,),) = pg_query(net, af.address, DB, "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s "
                                   "AND task_id = 'produce_shared' AND key = 'array'", (DAG_ID, run_id))
        array_ref = parse_reference(array_row, secret=airflow.extra_env["AIRFLOW__RAY__SECRET_KEY"].encode())
        assert array_ref.type == "numpy.ndarray" and array_ref.size >= 16 * 1024 * 1024, array_ref
        assert len(json.dumps(array_row)) < 4096  # a reference, not 16 MiB of data
        assert list(array_ref.nodes) == [worker_id], array_ref
        kept_log = "".join(p.read_text(errors="replace") for p in (airflow.home / "logs").rglob("*.log")
                           if "consume_kept" in str(p))
        assert re.search(r"gone from the Ray object store \(\w+\); restoring it from its checkpoint "
                         rf"s3://{BUCKET}/netns/{DAG_ID}/", kept_log), kept_log[-4000:]
        assert any(k.startswith(f"netns/{DAG_ID}/") for k in s3_keys(net, s3_endpoint, s3_secret, "netns/"))
        hostnames = {h for (h,) in pg_query(net, af.address, DB, "SELECT DISTINCT hostname FROM task_instance "
                                            "WHERE run_id IN (%s, %s)", (run_id, basics))}
        # Both Celery workers ran tasks, under the airflow host's own name (not "localhost").
        assert hostnames == {"airflow/celery-worker-1", "airflow/celery-worker-2"}, hostnames

        # -- no loopback, no shared disk --------------------------------------------------------------
        env = {k: v for k, v in airflow.extra_env.items() if k.startswith(("AIRFLOW", "RAY"))}
        ray_conn = json.loads(env["AIRFLOW_CONN_RAY_DEFAULT"])
        assert ray_conn["extra"]["address"] == f"{head.address}:{GCS_PORT}"
        assert json.loads(env["AIRFLOW_CONN_CKPT_S3"])["extra"]["endpoint_url"] == s3_endpoint
        assert f"@{af.address}:{PG_PORT}/" in airflow.db_url
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith(f"redis://{af.address}:{REDIS_PORT}/")
        assert not [k for k, v in env.items() if "127.0.0.1" in v or "localhost" in v], env

        # Each host sees an empty directory where another host's disk is, and the code read-only.
        for viewer, other in (("rayhead", "rayworker"), ("rayworker", "rayhead"), ("airflow", "rayhead"),
                              ("rayhead", "airflow")):
            if hosts[viewer].alive():
                seen = hosts[viewer].run(["ls", "-A", str(hosts[other].disk)])
                assert seen.returncode == 0 and seen.stdout == "", (viewer, other, seen)
        probe = head.run(["touch", str(Path(__file__).with_name(".netns-write-probe"))])
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe

        flows = tap.flows()
        expected = {
            ("client", "airflow", API_PORT),  # the REST API, from the client namespace
            ("airflow", "rayhead", GCS_PORT),  # the Airflow host's Ray node and drivers
            ("rayworker", "rayhead", GCS_PORT),
            ("rayworker", "s3", S3_PORT),  # produce_kept's checkpoint, written on the worker host
            ("rayhead", "s3", S3_PORT),  # ... and restored on the head
        }
        assert expected <= flows, (sorted(expected - flows), sorted(flows))
        # The shared array went between the nodes' object managers (whichever side dialled).
        assert {("rayhead", "rayworker", OBJECT_MANAGER_PORT), ("rayworker", "rayhead", OBJECT_MANAGER_PORT)} & flows
        # The services other hosts use listen on their host's address (weed mini adds a loopback listener of
        # its own, which no other host can reach); the Airflow host's own services on that address *only*, so
        # even a same-host client configured with 127.0.0.1 would have failed.
        listeners = {(host, port): {ip.removeprefix("::ffff:") for ip, p in tap.listening.get(host, ()) if p == port}
                     for host, port in (("airflow", API_PORT), ("airflow", PG_PORT), ("airflow", REDIS_PORT),
                                        ("rayhead", GCS_PORT), ("s3", S3_PORT))}
        for (host, port), ips in listeners.items():
            assert network.address(host) in ips or ips & {"0.0.0.0", "::"}, (host, port, ips)
        for port in (API_PORT, PG_PORT, REDIS_PORT):
            assert listeners["airflow", port] == {af.address}, (port, listeners["airflow", port])
        assert set(HOST_NUMBERS) >= {c for c, _, _ in flows} | {s for _, s, _ in flows}
        print(f"flows between hosts: {sorted(flows)}")
        loopback = sorted(tap.loopback())
        print(f"loopback connections, each within one host ({len(loopback)}): {loopback[:40]}")
    except TopologyError as exc:
        pytest.fail(str(exc))
    finally:
        if tap is not None:
            tap.stop()
        if airflow is not None:
            components = airflow.components + components
        survivors = stop_hosts(list(hosts.values()), components)
        if net is not None:
            net.close()
        leftover = network.destroy()
        shutil.rmtree(base, ignore_errors=True)
        assert not survivors, survivors
        assert not leftover, leftover
