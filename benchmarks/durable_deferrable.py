"""Long Ray tasks on few Airflow worker slots, deferrable against not; and what a durable re-attach costs.

Under the real scheduler (LocalExecutor, SQLite, ``[core] parallelism`` = 2) and a triggerer, against
a Ray head started for the benchmark (``LocalRayCluster``, 4 CPUs, its own home):

1. ``ray_deferrable_wide`` and ``ray_not_deferrable_wide`` (``tests/dags/deferrable_dags.py``):
   8 mapped ``@task.ray`` tasks of ``--sleep`` seconds each, run one DAG after the other. Reported:
   wall time, the most Ray bodies running at once, and waves (wall / sleep).
2. ``tests/dags/durable_dags.py``: the task runner and its supervisor are SIGKILLed while the Ray
   task runs; reported from the retry's own log: time from the retry's first log line to
   "Re-attached" (durable), against the time from the retry's first line to the body's end when the
   retry runs the body again (``durable=False``).

    python benchmarks/durable_deferrable.py [--sleep 30]

Writes ``benchmarks/results/durable_deferrable.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.benchutil import ROOT, cpu_model, provider_commit, publish

from scripts.local_topology import Airflow
from tests.support.deployment import calls, intervals, max_overlap, task_processes, try_logs

RESULTS = ROOT / "benchmarks" / "results"


def _events(log: str) -> list[tuple[float, str]]:
    out = []
    for line in log.splitlines():
        try:
            rec = json.loads(line)
            at = dt.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        out.append((at, str(rec.get("event", ""))))
    return out


def _deployment(work: Path, name: str, dag_file: Path, env: dict[str, str]) -> Airflow:
    dags = work / name / "dags"
    dags.mkdir(parents=True)
    shutil.copy(dag_file, dags / dag_file.name)
    airflow = Airflow(home=work / name / "home", dags=dags, db_url=f"sqlite:///{work / name / 'airflow.db'}",
                      extra_env=env)
    airflow.migrate()
    return airflow


def slots(work: Path, sleep_s: float) -> dict[str, float]:
    markers = work / "markers-wide"
    markers.mkdir()
    airflow = _deployment(work, "wide", ROOT / "tests" / "dags" / "deferrable_dags.py", {
        "AIRFLOW_RAY_TEST_MARKERS": str(markers), "AIRFLOW_RAY_TEST_SLEEP_S": str(sleep_s),
        "AIRFLOW__CORE__PARALLELISM": "2"})
    result: dict[str, float] = {}
    try:
        airflow.start(triggerer=True)
        for dag_id in ("ray_deferrable_wide", "ray_not_deferrable_wide"):
            airflow.wait(f"{dag_id} parsed", lambda d=dag_id: airflow.api.has_dag(d), 150)
        for dag_id, label in (("ray_deferrable_wide", "deferrable"), ("ray_not_deferrable_wide", "not_deferrable")):
            started = time.monotonic()
            run = airflow.api.trigger(dag_id)
            state = airflow.wait(dag_id, lambda d=dag_id, r=run: airflow.api.run_state(d, r), 30 * sleep_s)
            wall = time.monotonic() - started
            if state != "success":
                raise RuntimeError(f"{dag_id} ended {state}\n{airflow.diagnostics()}")
            result[f"{label}_wall_s"] = round(wall, 1)
            result[f"{label}_max_overlap"] = max_overlap(intervals(markers / dag_id))
            result[f"{label}_waves"] = round(wall / sleep_s, 2)
    finally:
        airflow.stop()
    return result


def reattach(work: Path) -> dict[str, float]:
    markers = work / "markers-durable"
    markers.mkdir()
    conn = json.loads(__import__("os").environ["AIRFLOW_CONN_RAY_DEFAULT"])
    conn["extra"] = {**conn["extra"], "lease_timeout": 10}
    airflow = _deployment(work, "durable", ROOT / "tests" / "dags" / "durable_dags.py", {
        "AIRFLOW_RAY_TEST_MARKERS": str(markers), "AIRFLOW_CONN_RAY_DEFAULT": json.dumps(conn),
        "AIRFLOW_RAY_TEST_SLEEP_S": "45",  # fixed-length bodies: the rerun's cost is part of what is measured
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3"})
    dag_ids = ("ray_durable_reattach", "ray_durable_off")
    try:
        airflow.start()
        for dag_id in dag_ids:
            airflow.wait(f"{dag_id} parsed", lambda d=dag_id: airflow.api.has_dag(d), 150)
        runs = {d: airflow.api.trigger(d) for d in dag_ids}
        airflow.wait("bodies to start", lambda: all(calls(markers / d)["start"] for d in dag_ids), 180, 0.5)
        (scheduler,) = [c for c in airflow.components if c.name == "scheduler"]
        for proc in task_processes(scheduler):
            proc.send_signal(signal.SIGKILL)
        for d, r in runs.items():
            state = airflow.wait(d, lambda d=d, r=r: airflow.api.run_state(d, r), 400)
            if state != "success":
                raise RuntimeError(f"{d} ended {state}\n{airflow.diagnostics()}")
        durable = _events(try_logs(airflow.home, "ray_durable_reattach", "long_body", 2))
        rerun = _events(try_logs(airflow.home, "ray_durable_off", "long_body", 2))
        attached = next(at for at, e in durable if "Re-attached" in e)
        rerun_done = next(at for at, e in rerun if "Ray task" in e and "finished after" in e)
        return {"retry_start_to_attached_s": round(attached - durable[0][0], 2),
                "retry_start_to_rerun_done_s": round(rerun_done - rerun[0][0], 2)}
    finally:
        airflow.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sleep", type=float, default=30.0, help="seconds each wide Ray task sleeps")
    args = parser.parse_args()
    import os

    from airflow_ray_provider.local_cluster import LocalRayCluster

    (ROOT / "benchmarks" / ".work").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="durable-deferrable-", dir=ROOT / "benchmarks" / ".work"))
    cluster = LocalRayCluster(work / "ray", num_cpus=4)
    state = cluster.ensure_running()
    os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps({"conn_type": "ray", "password": cluster.auth_token(),
                                                         "extra": {"address": state.address,
                                                                   "namespace": "bench"}})
    try:
        result = {"sleep_s": args.sleep, **slots(work, args.sleep), **reattach(work),
                  "commit": provider_commit(), "cpu": cpu_model(), "date": dt.date.today().isoformat()}
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    (RESULTS / "durable_deferrable.json").write_text(json.dumps(result, indent=2) + "\n")
    report = (
        f"# durable_deferrable ({result['date']}, {result['cpu']}, provider {result['commit']})\n\n"
        f"`python benchmarks/durable_deferrable.py --sleep {args.sleep:g}`\n\n"
        f"8 mapped `@task.ray` tasks of {args.sleep:g} s on 2 Airflow worker slots (LocalExecutor, SQLite):\n\n"
        "| mode | wall (s) | waves (wall / sleep) | most Ray bodies at once |\n|---|---|---|---|\n"
        f"| deferrable | {result['deferrable_wall_s']} | {result['deferrable_waves']} | "
        f"{result['deferrable_max_overlap']} |\n"
        f"| not deferrable | {result['not_deferrable_wall_s']} | {result['not_deferrable_waves']} | "
        f"{result['not_deferrable_max_overlap']} |\n\n"
        "A retry after SIGKILL (45 s body, killed a few seconds in), from the retry's first log line:\n\n"
        f"- durable, to re-attached: {result['retry_start_to_attached_s']} s\n"
        f"- `durable=False`, to the rerun body's end: {result['retry_start_to_rerun_done_s']} s\n")
    publish(report, RESULTS / "durable_deferrable.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
