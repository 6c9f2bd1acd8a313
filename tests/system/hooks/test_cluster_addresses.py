"""Pointing at an existing cluster: Ray Client (``ray://``) and a cluster with token authentication.

Both use one head of this module's, started with the provider's launcher (free ports, its own temp dir) and
the user's own token, and run a checkpointed DAG through it, as a user with a shared cluster would. A KubeRay
head service (``host:port``) is the GCS form every other test uses against the session head.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from airflow_ray_provider.hooks.ray import RayHook
from airflow_ray_provider.local_cluster import LocalClusterState, LocalRayCluster
from tests.support.dag_runs import run_py

# The DAG runs (subprocesses) use the session's DB.
pytestmark = [pytest.mark.usefixtures("airflow_db"), pytest.mark.timeout(900)]

RUN = """
    dr = checkpoint_dags.ckpt_reuse_dag.test(run_conf={{"n": 4, "marker": {marker!r}}})
    states = task_states(dr)
    emit(states=states, total=pulled(dr, "total") if states.get("total") == "success" else None)
"""


def dag_run(conn: dict, marker: Path, airflow_home: Path) -> tuple[dict, str]:
    """The ``ckpt_reuse`` DAG (a checkpointed Ray task, then a Ray consumer) through ``conn``."""
    env = {"AIRFLOW_CONN_RAY_DEFAULT": json.dumps(conn),
           "AIRFLOW__RAY__CHECKPOINT_PATH": str(airflow_home / "address-checkpoints")}
    return run_py(RUN.format(marker=str(marker)), env=env, timeout=600)


@pytest.fixture(scope="module")
def token_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalClusterState, str]]:
    """A head of this module's own, started with the user's own token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), as
    a shared cluster with token authentication is; both tests use it (one head start fewer than one each)."""
    token = secrets.token_hex(16)
    cluster = LocalRayCluster(tmp_path_factory.mktemp("token-head"), num_cpus=2)
    with pytest.MonkeyPatch.context() as scoped:  # only the head's own processes see these
        # This process may have connected with a token already (RayHook sets RAY_AUTH_* for Ray's loader);
        # the head must run with the token given here.
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            scoped.delenv(name, raising=False)
        scoped.setenv("RAY_AUTH_MODE", "token")
        scoped.setenv("RAY_AUTH_TOKEN", token)
        state = cluster.ensure_running()
    try:
        yield state, token
    finally:
        cluster.stop()


def test_ray_client_address_runs_tasks_and_checkpoints(token_head: tuple[LocalClusterState, str], tmp_path: Path,
                                                       airflow_home: Path) -> None:
    state, token = token_head
    assert state.client_address and state.client_address.startswith("ray://127.0.0.1:")
    # The head requires its token, also through Ray Client.
    result, output = dag_run({"conn_type": "ray", "password": token,
                              # 60 s: Ray Client's connect ran past 30 s once on the loaded 2-core CI machine.
                              "extra": {"address": state.client_address, "connect_timeout": 60}},
                             tmp_path / "marker.log", airflow_home)
    # CI saw Ray's proxier fail to start this client's server once; its own log says why.
    assert result == {"states": {"produce": "success", "total": "success"}, "total": 14}, \
        output[-6000:] + _client_server_logs(state)
    assert (tmp_path / "marker.log").read_text() == "produce 4\n"


def _client_server_logs(state: LocalClusterState) -> str:
    """The tails of the head's Ray Client server logs (``ray_client_server*``), for a failure message."""
    logs = sorted(Path(state.temp_dir).glob("ray/session_*/logs/ray_client_server*"))
    return "".join(f"\n--- {path.name}\n" + path.read_text(errors="replace")[-3000:] for path in logs)


def test_token_auth_right_token_works_wrong_or_missing_is_refused_and_never_logged(
        token_head: tuple[LocalClusterState, str], connection: Callable[..., str], tmp_path: Path,
        airflow_home: Path) -> None:
    (state, token), wrong = token_head, secrets.token_hex(16)
    base = {"conn_type": "ray", "host": "127.0.0.1", "port": state.gcs_port,
            "extra": {"namespace": "token-auth", "connect_timeout": 60}}
    # A DAG run with the wrong token fails before anything ran. (A missing token goes the same way through the
    # same connect; its message is checked by the probe below, which saves a fresh interpreter: about a minute.)
    outputs = {}
    result, outputs["wrong"] = dag_run({**base, "password": wrong}, tmp_path / "wrong.log", airflow_home)
    assert result["states"]["produce"] == "failed" and result["total"] is None, outputs["wrong"][-6000:]
    assert not (tmp_path / "wrong.log").exists()  # refused before anything ran
    address = f"Cannot connect to the Ray cluster at 127.0.0.1:{state.gcs_port}: the cluster"
    assert f"{address} refused the token in the ray connection's password" in outputs["wrong"]
    # The UI's Test button (a probe subprocess) tells the same two refusals apart, and passes the right token.
    probes = {case: RayHook(connection(f"ray_{case}", **base, **({"password": password} if password else {})))
              .test_connection() for case, password in (("wrong", wrong), ("missing", None), ("right", token))}
    assert probes["wrong"] == (False, f"{address} refused the token in the ray connection's password"), probes
    assert probes["missing"] == (False, f"{address} requires a token (RAY_AUTH_MODE=token): put it in the ray "
                                        "connection's password"), probes
    assert probes["right"][0] and probes["right"][1].startswith("Connected to Ray 2."), probes
    outputs.update({f"probe {case}": message for case, (_, message) in probes.items()})

    result, outputs["right"] = dag_run({**base, "password": token}, tmp_path / "right.log", airflow_home)
    assert result == {"states": {"produce": "success", "total": "success"}, "total": 14}, outputs["right"][-6000:]
    # Neither token shows up in anything the runs printed or in the task logs Airflow wrote.
    task_logs = "".join(p.read_text(errors="replace") for p in (airflow_home / "logs").rglob("*")
                        if p.is_file()) if (airflow_home / "logs").exists() else ""
    for text in (*outputs.values(), task_logs):
        assert token not in text and wrong not in text
