"""docker-compose.yaml's topology on loopback: CeleryExecutor with two workers, two Ray nodes, S3 checkpoints.

``scripts/local_topology.py`` starts the api-server, scheduler, dag-processor and two Celery workers
(Redis at 127.0.0.1:6379 as the broker, a fresh PostgreSQL database), a Ray head with the resource
``head_node`` plus a second node joined with ``ray start --address`` with ``worker_node``, and the
checkpoint store on the session's S3 server (SeaweedFS). Example DAGs are triggered through the REST API.

The joined node cannot reach a loopback-only head, so the head is ``loopback_only=False`` (it binds the
machine's address too); token auth stays on: the second node, ``ray_nodes`` and the tasks (through the
``ray_default`` password) present the head's token.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from airflow_ray_provider.local_cluster import LocalRayCluster, port_open
from airflow_ray_provider.xcom.reference import parse_reference
from scripts.local_topology import TopologyError, celery_airflow, join_ray_node, stop_all
from tests.conftest import BUCKET, PG_HOST, PG_PORT, PG_USER, pg_query

pytestmark = pytest.mark.postgres
REDIS = ("127.0.0.1", 6379)
TIMEOUT_S = 600.0


@pytest.fixture
def redis_broker() -> str:
    if not port_open(*REDIS, timeout=2):
        pytest.skip(f"Redis (the Celery broker) not reachable at {REDIS[0]}:{REDIS[1]}")
    return f"redis://{REDIS[0]}:{REDIS[1]}/0"


def test_celery_workers_and_two_ray_nodes(pg_database: str, redis_broker: str, tmp_path: Path,
                                          request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    request.getfixturevalue("s3_endpoint")  # after the skips: nothing starts when PostgreSQL or Redis is absent
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # a head that other nodes can reach keeps token auth
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    head = LocalRayCluster(tmp_path / "ray-head", num_cpus=2, resources={"head_node": 1}, loopback_only=False)
    state = head.ensure_running()
    token = head.auth_token()
    if state.auth_mode != "token" or not token:
        head.stop()
        pytest.fail(f"the topology's head, which other nodes can reach, must run with token auth: {state}")
    try:
        node, nodes = join_ray_node(state.address, "ray-worker", {"worker_node": 1}, 2, tmp_path, auth_token=token)
    except TopologyError as exc:
        head.stop()
        pytest.fail(str(exc))
    airflow = celery_airflow(tmp_path / "airflow", pg_database, redis_broker, {
        "address": state.address, "namespace": "topology",
        "checkpoint_path": f"s3://{BUCKET}/topology", "checkpoint_conn_id": "ckpt_s3"},
        pg_server=f"{PG_USER}@{PG_HOST}:{PG_PORT}", ray_password=token)
    api = airflow.api
    try:
        assert len(nodes) == 2, nodes
        node_of = {("worker_node" if "worker_node" in n["resources"] else "head_node"): n["id"] for n in nodes}
        airflow.migrate()
        airflow.start(celery_workers=2)
        for dag_id in ("example_ray_basics", "example_ray_two_nodes"):
            airflow.wait(f"DAG {dag_id} to be parsed", lambda d=dag_id: api.has_dag(d), 180)
        basics = api.trigger("example_ray_basics", {"shards": 6, "rows_per_shard": 2000})
        two_nodes = api.trigger("example_ray_two_nodes", {"mb": 16, "wait_for_node_loss": True})

        def task_state(dag_id: str, run_id: str, task_id: str) -> str | None:
            rows = pg_query(pg_database, "SELECT state FROM task_instance WHERE dag_id = %s AND run_id = %s "
                             "AND task_id = %s", (dag_id, run_id, task_id))
            return rows[0][0] if rows else None

        # The checkpointed array was made on the worker node and nobody has read it yet: kill that node.
        airflow.wait("wait_for_node_loss to start", lambda: task_state(
            "example_ray_two_nodes", two_nodes, "wait_for_node_loss") == "running", TIMEOUT_S)
        assert task_state("example_ray_two_nodes", two_nodes, "produce_kept") == "success"
        stop_all([node], sig_first=signal.SIGKILL)  # SIGKILL: raylet, object store and workers of that node at once
        states = {run: airflow.wait(f"run {run}", lambda r=run, d=dag: api.run_state(d, r), TIMEOUT_S)
                  for run, dag in ((basics, "example_ray_basics"), (two_nodes, "example_ray_two_nodes"))}
        assert states == {basics: "success", two_nodes: "success"}, airflow.diagnostics()

        # Both Celery workers ran tasks (each records its name through hostname_callable).
        hosts = {h for (h,) in pg_query(pg_database, "SELECT DISTINCT hostname FROM task_instance")}
        assert {h.rsplit("/", 1)[-1] for h in hosts} == {"celery-worker-1", "celery-worker-2"}, hosts

        # The shared array was made on the worker node and used on the head; the DB holds only its reference.
        xcoms = {(t, k): v for t, k, v in pg_query(
            pg_database, "SELECT task_id, key, value FROM xcom WHERE dag_id = %s AND run_id = %s",
            ("example_ray_two_nodes", two_nodes))}
        # Signed with the deployment's [ray] secret_key, which this test process does not have as its own.
        secret = airflow.extra_env["AIRFLOW__RAY__SECRET_KEY"].encode()
        array_ref = parse_reference(xcoms[("produce_shared", "array")], secret=secret)
        assert array_ref.type == "numpy.ndarray" and array_ref.size >= 16 * 1024 * 1024
        assert len(json.dumps(xcoms[("produce_shared", "array")])) < 4096  # a reference, not 16 MiB of data
        assert list(array_ref.nodes) == [node_of["worker_node"]]
        report = api.ok("GET", f"/api/v2/dags/example_ray_two_nodes/dagRuns/{two_nodes}/taskInstances/report/"
                               "xcomEntries/return_value")["value"]
        report = json.loads(report) if isinstance(report, str) else report
        assert report["produced_on"] == node_of["worker_node"] and report["consumed_on"] == node_of["head_node"]
        assert report["equal"] is True and report["waited"].startswith("worker node gone after")

        # The checkpointed array outlived its node: restored from S3 on the head, not recomputed.
        assert report["kept_consumed_on"] == node_of["head_node"]
        tries = dict(pg_query(pg_database, "SELECT task_id, try_number FROM task_instance WHERE dag_id = %s "
                               "AND run_id = %s", ("example_ray_two_nodes", two_nodes)))
        assert tries["produce_kept"] == 1 and tries["consume_kept"] == 1, tries
        kept_log = "".join(p.read_text(errors="replace") for p in (airflow.home / "logs").rglob("*.log")
                           if "consume_kept" in str(p))
        assert re.search(r"gone from the Ray object store \(\w+\); restoring it from its checkpoint "
                         rf"s3://{BUCKET}/topology/example_ray_two_nodes/", kept_log), kept_log[-4000:]
    except TopologyError as exc:
        pytest.fail(str(exc))
    finally:
        survivors = airflow.stop() + stop_all([node])
        head.stop()
        assert not survivors, survivors
