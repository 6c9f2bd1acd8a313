"""The README's main job and the fault-tolerance example, which need processes or heads of their own.

``make example`` runs ``scripts/run_example.py``: a fresh Airflow home, the embedded head and ``airflow dags
test`` in a process of its own, as on a new machine. Its SQLite DB is a copy of the session's migrated template
(the script's ``airflow db migrate`` then finds nothing to do): a migration is Airflow's own code and costs
40-77 s of CPU on this machine, paid once per session instead. The fault-tolerance example restarts
its (embedded) head mid-run, so it runs on one of its own, in this process, with its checkpoints on the
session's S3 server (the one test of a whole cluster restarted between a checkpointed upstream and its
consumers; a plain consumer reading a lost result from its checkpoint is in
tests/integration/operators/test_checkpoint.py). The other examples run in
tests/integration/test_example_dags.py; the Tune search killed mid-way in tests/system/cluster/test_try_cleanup.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from airflow_ray_provider.local_cluster import LocalRayCluster, user_environ
from airflow_ray_provider.xcom.reference import parse_reference
from tests.support import ROOT
from tests.support.dag_runs import run_on_embedded_head
from tests.support.examples import example_dag
from tests.support.fixtures import sqlite_copy
from tests.support.rows import stored, tries
from tests.support.s3server import BUCKET


@pytest.mark.timeout(1500)
def test_main_job_runs_the_higgs_example(tmp_path: Path, migrated_sqlite: Path) -> None:
    """``scripts/run_example.py`` (``make example``) in a fresh Airflow home, with small params."""
    sqlite_copy(migrated_sqlite, tmp_path / "airflow.db")  # where the script's default SQLite DB is
    # As from a user's shell: without the RAY_AUTH_* this process set when it connected to its own heads.
    env = {**user_environ(), "AIRFLOW_HOME": str(tmp_path)}
    for name in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__DAGS_FOLDER",  # the script's own
                 "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", "AIRFLOW_CONN_RAY_DEFAULT"):
        env.pop(name, None)
    # Without Ray Train: it adds about 80 s (measured in-process on a warm head), and trains in
    # tests/integration/test_example_dags.py.
    conf = {"rows": 20_000, "rounds": 10, "ray_train": False}
    lines: list[str] = []
    dag_test_alive_at_first_progress: bool | None = None
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run_example.py"), "--conf",
                                 json.dumps(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        assert proc.stdout is not None
        watchdog = threading.Timer(1200, proc.kill)  # a hung script fails the test instead of hanging it
        watchdog.start()
        for line in proc.stdout:  # read as printed: progress must arrive while the DAG runs, not at its end
            lines.append(line)
            if dag_test_alive_at_first_progress is None and re.search(r"^\s+[0-9.]+s  \S+\s+running$", line):
                dag_test_alive_at_first_progress = any(
                    "dags" in c.cmdline() and "test" in c.cmdline() for c in psutil.Process(proc.pid).children())
        proc.wait(timeout=60)
        watchdog.cancel()
    finally:
        LocalRayCluster(tmp_path / "ray").stop()  # the script leaves its embedded head running, as users want
    stdout = "".join(lines)
    log_file = tmp_path / "example_ray_xgboost_higgs.log"
    log = log_file.read_text() if log_file.exists() else ""
    assert proc.returncode == 0, stdout[-6000:] + log[-6000:]
    # Progress: each task's state as it changes, with the elapsed time, printed while the DAG test runs.
    assert dag_test_alive_at_first_progress, stdout
    progress = re.findall(r"^\s+([0-9.]+)s  (\S+)\s+(\S+)", stdout, re.M)
    for task_id in ("prepare_data", "train_xgboost_ray", "evaluate", "train_ray_train", "report"):
        assert [state for _, label, state in progress if label == task_id][-1] == "success", stdout
    assert [float(t) for t, _, _ in progress] == sorted(float(t) for t, _, _ in progress), stdout
    assert "DAG example_ray_xgboost_higgs: success" in stdout
    found = re.search(r"^Accuracy: ([0-9.]+) \(xgboost-ray\), skipped \(Ray Train\)", stdout, re.M)
    assert found, stdout
    # A HIGGS-shaped synthetic set: a booster beats the 0.5 of guessing by a wide margin, as on real HIGGS.
    assert float(found[1]) > 0.7, stdout
    checkpoints = tmp_path / "ray-checkpoints" / "example_ray_xgboost_higgs"
    assert f"Checkpoints: {checkpoints}" in stdout
    assert list(checkpoints.glob("*/train_xgboost_ray/-1/result/manifest.json"))
    assert 'load_result("example_ray_xgboost_higgs", "train_xgboost_ray")' in stdout
    assert "xgboost-ray trained on 16000 rows with 2 actors" in log  # the embedded head has 2 CPUs here


@pytest.mark.timeout(900)
def test_fault_tolerance_example_recovers_after_a_cluster_restart(
        airflow_db: Path, airflow_home: Path, s3_endpoint: str, ray_connection: Callable[..., Any],
        capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Checkpointed upstream (on S3), the embedded head restarted on new ports, a downstream that fails once:
    the data come back equal, restored from the checkpoint the reference names."""
    ray_connection({"conn_type": "ray", "extra": {"address": "local", "namespace": "example-ft",
                                                   "checkpoint_path": f"s3://{BUCKET}/restart",
                                                   "checkpoint_conn_id": "ckpt_s3"}})
    dr, output, (restart, recovered, verified) = run_on_embedded_head(
        example_dag("example_ray_fault_tolerance"), {"rows": 50_000}, airflow_home, capfd, caplog,
        pull=("restart_ray", "transform", "verify"))
    before, after = restart.removeprefix("Ray head restarted: ").split(" -> ")
    assert before != after
    assert tries(dr) == {"produce": 1, "restart_ray": 1, "transform": 2, "verify": 1}
    assert "simulated transient failure on the first try" in output
    assert "restoring it from its checkpoint" in output  # the new cluster got the frame from the store
    assert recovered["rows"] == 50_000 and recovered["try"] == 2
    assert verified.startswith("recovered 50000 rows equal to the original on try 2")
    ref = parse_reference(stored("example_ray_fault_tolerance", dr.run_id, "produce", key="frame"))
    assert ref.checkpoint is not None, ref
    assert ref.checkpoint["uri"].startswith(f"s3://{BUCKET}/restart/example_ray_fault_tolerance/"), ref.checkpoint
    assert ref.checkpoint["part"] == 0 and len(ref.checkpoint["sha256"]) == 64
