"""The example DAGs and the README's main job, run end to end and checked by their results.

Each example runs as a user would run it: the file from ``example_dags/`` loaded by a DagBag,
``dag.test()`` with small Params, the Ray XCom backend on, a real Ray cluster.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil
import pytest
from ray.tune.search.variant_generator import generate_variants

from airflow_ray_provider.cluster.checkpoint import safe_component
from airflow_ray_provider.local_cluster import LocalRayCluster
from tests.conftest import BUCKET, s3_client
from tests.dag_runs import result_of, session_ray_conn, start_py

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "example_dags"


def start_example(dag_id: str, conf: dict[str, Any], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``dag.test(run_conf=conf)`` of an example DAG in a subprocess; emits states, try numbers and XComs."""
    return start_py(f"""
        from airflow.dag_processing.dagbag import DagBag
        from airflow.models.taskinstance import TaskInstance as TI
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import select
        bag = DagBag(dag_folder={str(EXAMPLES / (dag_id + ".py"))!r})
        assert not bag.import_errors, bag.import_errors
        dr = bag.dags[{dag_id!r}].test(run_conf={conf!r})
        with create_session() as s:
            tries = dict(s.execute(select(TI.task_id, TI.try_number).where(
                TI.dag_id == dr.dag_id, TI.run_id == dr.run_id, TI.map_index == -1)).all())
            keys = s.execute(select(XComModel.task_id, XComModel.key).where(
                XComModel.dag_id == dr.dag_id, XComModel.run_id == dr.run_id, XComModel.map_index == -1)).all()
        values = {{t if k == "return_value" else f"{{t}}.{{k}}": pulled(dr, t, k) for t, k in keys}}
        emit(run_id=dr.run_id, states=task_states(dr), tries=tries,
             values={{k: v for k, v in values.items() if isinstance(v, (dict, str, int, float, list))}})
    """, env={"AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLES), **(env or {})})  # dag.test() needs its DAGs folder


def import_example(name: str) -> ModuleType:
    """An example DAG file as a module, for its helpers."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def run_example(dag_id: str, conf: dict[str, Any], env: dict[str, str] | None = None,
                timeout: float = 1200) -> tuple[dict[str, Any], str]:
    result, output = result_of(start_example(dag_id, conf, env), timeout)
    assert set(result["states"].values()) == {"success"}, output[-8000:]
    return result, output


def test_main_job_runs_the_higgs_example(ray_cluster: str, tmp_path: Path) -> None:
    """``scripts/run_example.py`` (``make example``) in a fresh Airflow home, with small params."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")  # the script's own SQLite DB under its home
    env.pop("AIRFLOW__CORE__DAGS_FOLDER")
    conf = {"rows": 20_000, "rounds": 10}
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
    found = re.search(r"^Accuracy: ([0-9.]+) \(xgboost-ray\), ([0-9.]+) \(Ray Train\)", stdout, re.M)
    assert found, stdout
    # A HIGGS-shaped synthetic set: a booster beats the 0.5 of guessing by a wide margin, as on real HIGGS.
    assert float(found[1]) > 0.7 and float(found[2]) > 0.7, stdout
    checkpoints = tmp_path / "ray-checkpoints" / "example_ray_xgboost_higgs"
    assert f"Checkpoints: {checkpoints}" in stdout
    assert list(checkpoints.glob("*/train_xgboost_ray/-1/result/manifest.json"))
    assert 'load_result("example_ray_xgboost_higgs", "train_xgboost_ray")' in stdout
    assert "xgboost-ray trained on 16000 rows with 2 actors" in log  # the embedded head has 2 CPUs here


def test_higgs_real_loader_reads_the_uci_layout_and_refuses_other_files(ray_cluster: str, tmp_path: Path) -> None:
    """``data_path`` given: the real HIGGS format (gzip, no header, label first) trains; a wrong file fails fast."""
    higgs = import_example("example_ray_xgboost_higgs")
    real = tmp_path / "HIGGS.csv.gz"
    higgs.synthetic_higgs(str(tmp_path / "plain.csv"), 6000, seed=3)
    import gzip
    import shutil

    with open(tmp_path / "plain.csv", "rb") as src, gzip.open(real, "wb") as dst:
        shutil.copyfileobj(src, dst)
    result, output = run_example("example_ray_xgboost_higgs", {"data_path": str(real), "rows": 5000, "rounds": 5,
                                                                  "ray_train": False})
    assert result["values"]["prepare_data"] == str(real)
    assert result["values"]["evaluate"]["rows"] == 1000  # 20% of the 5,000 rows read
    assert "generated" not in output
    bad = tmp_path / "with_header.csv"
    bad.write_text("label," + ",".join(higgs.COLUMNS[1:]) + "\n" + "1," + ",".join(["0.5"] * 28) + "\n")
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("1,0.5,0.25\n")
    missing = tmp_path / "missing.csv"
    for path, message in ((bad, f"HIGGS data at {str(bad)!r} has non-numeric values"),
                          (narrow, f"HIGGS data at {str(narrow)!r} has 3 columns; expected 29"),
                          (missing, f"Cannot read HIGGS data at {str(missing)!r}")):
        with pytest.raises(ValueError, match=re.escape(message)):
            higgs.check_higgs_layout(str(path))


def driver_pid(task_label: str) -> int | None:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0] == f"ray::{task_label}":
            return proc.pid
    return None


def test_tune_search_resumes_after_the_driver_dies_mid_search(ray_cluster: str, s3_endpoint: str) -> None:
    """The search task is killed after some trials finished; the Airflow retry resumes the same experiment."""
    s3 = s3_client(s3_endpoint)
    env = session_ray_conn(checkpoint_path=f"s3://{BUCKET}/examples", checkpoint_conn_id="ckpt_s3")
    proc = start_example("example_ray_tune_xgboost", {"num_samples": 8, "rounds": 16}, env)
    finished_before_kill, deadline = 0, time.monotonic() + 900
    while not finished_before_kill and proc.poll() is None and time.monotonic() < deadline:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="examples/example_ray_tune_xgboost/")
                .get("Contents", []) if re.search(r"/experiment_state-[^/]+\.json$", o["Key"])]
        if keys:
            state = s3.get_object(Bucket=BUCKET, Key=sorted(keys)[-1])["Body"].read().decode()
            finished = state.count('\\"status\\": \\"TERMINATED\\"')
            pid = driver_pid("example_ray_tune_xgboost.search")
            if finished >= 2 and pid:
                os.kill(pid, signal.SIGKILL)  # the Tune driver dies; its trials go with it
                finished_before_kill = finished
        time.sleep(0.5)
    result, output = result_of(proc, timeout=1200)
    assert finished_before_kill >= 2, output[-8000:]
    assert set(result["states"].values()) == {"success"}, output[-8000:]
    assert result["tries"]["search"] == 2, output[-12000:]
    assert result["values"]["search.trials"] == 8
    resumed = re.search(r"Resuming the Tune experiment at (\S+): (\d+) finished trials kept", output)
    assert resumed, output[-8000:]
    run_folder = f"s3://{BUCKET}/examples/example_ray_tune_xgboost/{safe_component(result['run_id'])}"
    assert resumed[1] == f"{run_folder}/search/-1/tune/xgboost-breast-cancer"
    # What the state held when the driver died was kept, not run again.
    assert int(resumed[2]) >= finished_before_kill
    assert len(result["values"]["search.kept_trials"]) == int(resumed[2])
    scored = result["values"]["evaluate"]
    assert scored["test_accuracy"] > 0.9 and scored["test_rows"] == 114
    assert set(scored["config"]) == {"max_depth", "min_child_weight", "subsample", "eta"}
    line = result["values"]["report"]
    found = re.search(r"best of (\d+) trials has validation logloss ([0-9.]+)", line)
    assert found and int(found[1]) == 8 and float(found[2]) < 0.4, line
    # The seeded sampler (the seed Param's default, 0) tried exactly the configurations it draws again here,
    # the resumed part of the search included.
    tune_example, rng = import_example("example_ray_tune_xgboost"), np.random.default_rng(0)
    drawn = [variant["config"] for _ in range(8)
             for _, variant in generate_variants({"config": tune_example.search_space(16)}, random_state=rng)]
    leaderboard = result["values"]["search.leaderboard"]
    tried = sorted((row["config"] for row in leaderboard), key=lambda config: config["eta"])
    assert tried == [pytest.approx({k: v for k, v in config.items() if k != "rounds"})
                     for config in sorted(drawn, key=lambda config: config["eta"])]
    assert leaderboard[0]["logloss"] == pytest.approx(float(found[2]), abs=1e-4)


def test_fault_tolerance_example_recovers_after_a_cluster_restart(ray_cluster: str, airflow_home: Path) -> None:
    """Checkpointed upstream, the embedded head restarted, a downstream that fails once: data come back equal."""
    try:
        result, output = run_example("example_ray_fault_tolerance", {"rows": 50_000},
                                     session_ray_conn(address="local", namespace="example-ft"))
    finally:
        LocalRayCluster(airflow_home / "ray").stop()
    before, after = result["values"]["restart_ray"].removeprefix("Ray head restarted: ").split(" -> ")
    assert before != after
    assert result["tries"] == {"produce": 1, "restart_ray": 1, "transform": 2, "verify": 1}
    assert "simulated transient failure on the first try" in output
    assert "restoring it from its checkpoint" in output  # the new cluster got the frame from the store
    recovered = result["values"]["transform"]
    assert recovered["rows"] == 50_000 and recovered["try"] == 2
    assert result["values"]["verify"].startswith("recovered 50000 rows equal to the original on try 2")


def test_basics_example_fans_out_over_ray_tasks(ray_cluster: str) -> None:
    result, output = run_example("example_ray_basics", {"shards": 3, "rows_per_shard": 1000})
    # Each shard seeds its own generator: the same draws, made here, give the expected sum.
    expected = 0
    for shard in range(3):
        rng = np.random.default_rng(shard)
        rng.normal(size=1000)
        expected += int(rng.integers(0, 10, size=1000).sum())
    assert result["values"]["report"] == f"3 Ray shards produced 3000 rows; sum(y) = {expected}"
    assert result["values"]["plan"] == [0, 1, 2]
    assert "[ray] shard 2: 1000 rows" in output  # the Ray worker's print reached the task log


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_example_dag_files_import_cleanly(path: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(path))
    assert not bag.import_errors, bag.import_errors
    assert bag.dags
