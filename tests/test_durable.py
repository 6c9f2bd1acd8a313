"""Durable ``@task.ray`` under the real scheduler: a retry after SIGKILL re-attaches to the running Ray task.

The scheduler (LocalExecutor) runs ``tests/dags/durable_dags.py``. While each DAG's Ray task runs,
the test SIGKILLs the task's process and its supervisor (the LocalExecutor worker), as a lost pod or
an OOM kill would. Airflow notices through the missing heartbeats and schedules the retry:

- durable (the default): the retry finds the record the first try left in the task state store,
  re-attaches, and the body runs once; the retry's log says it re-attached;
- ``durable=False``: the owner actor's lease (10 s here) cancels the orphaned Ray task before the
  retry starts, and the retry runs the body again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from scripts.local_topology import Airflow, TopologyError
from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.dag_runs import BACKEND

DAG_FILE = Path(__file__).resolve().parent / "dags" / "durable_dags.py"
PRELOAD_DAG_FILE = DAG_FILE.with_name("preload_dags.py")
DURABLE, NOT_DURABLE, FINISHED = "ray_durable_reattach", "ray_durable_off", "ray_durable_finished"
MAPPED = "ray_durable_mapped"  # two mapped instances with multiple_outputs
DAGS = (DURABLE, NOT_DURABLE, FINISHED, MAPPED)
LEASE_S = 10.0
HEARTBEAT_TIMEOUT_S = 15


def _task_processes(started_after: float) -> list[psutil.Process]:
    """The task runners (``airflow worker -- <ti id>``) and their supervisors, newer than ``started_after``."""
    # psutil's create_time rests on the boot time that /proc/stat gives in whole seconds: here it reads about
    # 0.99 s earlier than the fork, so a runner forked within a second of the trigger looked older than it and
    # was missed (CI, "found 8"). Nothing of this test's Airflow runs a task before the trigger, so the margin
    # takes in nothing else.
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("airflow worker -- ") and proc.info["create_time"] >= started_after - 2.0:
            found.append(proc)
            parent = proc.parent()
            if parent is not None:
                found.append(parent)
    return found


def _calls(marker: Path) -> dict[str, set[str]]:
    lines = marker.read_text().split("\n") if marker.exists() else []
    calls: dict[str, set[str]] = {"start": set(), "end": set()}
    for line in filter(None, lines):
        what, call, _ = line.split()
        calls[what].add(call)
    return calls


def _try_logs(home: Path, dag_id: str, task_id: str, attempt: int, map_index: int | None = None) -> str:
    logs = sorted((home / "logs").rglob(f"attempt={attempt}.log"))
    wanted = [p for p in logs if f"dag_id={dag_id}" in str(p) and f"task_id={task_id}" in str(p)
              and (map_index is None or f"map_index={map_index}" in str(p))]
    return "\n".join(p.read_text(errors="replace") for p in wanted)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_killed_try_is_reattached_to_or_started_over(database: str, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    if database == "postgres":
        db_url = (f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/"
                  f"{request.getfixturevalue('pg_database')}")
    else:
        db_url = f"sqlite:///{tmp_path / 'airflow.db'}"
    request.getfixturevalue("ray_cluster")
    dags, markers = tmp_path / "dags", tmp_path / "markers"
    dags.mkdir()
    markers.mkdir()
    shutil.copy(DAG_FILE, dags / DAG_FILE.name)
    shutil.copy(PRELOAD_DAG_FILE, dags / PRELOAD_DAG_FILE.name)
    conn = json.loads(os.environ["AIRFLOW_CONN_RAY_DEFAULT"])
    conn["extra"] = {**conn["extra"], "lease_timeout": LEASE_S}
    airflow = Airflow(home=tmp_path / "airflow-home", dags=dags, db_url=db_url, extra_env={
        "AIRFLOW_CONN_RAY_DEFAULT": json.dumps(conn),
        "AIRFLOW_RAY_TEST_MARKERS": str(markers), "AIRFLOW__CORE__XCOM_BACKEND": BACKEND,
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
        "AIRFLOW__CORE__PARALLELISM": "6",  # the five long tries run at once, so one kill catches them all
    })
    airflow.migrate()
    api = airflow.api
    try:
        airflow.start()
        for dag_id in (*DAGS, "preload_probe"):
            airflow.wait(f"DAG {dag_id} to be parsed", lambda d=dag_id: api.has_dag(d), 150)
        triggered = time.time()
        runs = {dag_id: api.trigger(dag_id) for dag_id in DAGS}
        airflow.wait("every body to start in Ray", lambda: all(
            len(_calls(markers / d)["start"]) >= (2 if d == MAPPED else 1) for d in runs), 180, interval=0.5)
        victims = _task_processes(triggered)
        assert len(victims) >= 10, f"expected 5 task runners and their supervisors, found {victims}"
        for proc in victims:
            proc.send_signal(signal.SIGKILL)
        killed = time.time()
        states = {d: airflow.wait(f"run of {d} to finish", lambda d=d, r=r: api.run_state(d, r), 300)
                  for d, r in runs.items()}
        home = airflow.home
        durable_calls, off_calls = _calls(markers / DURABLE), _calls(markers / NOT_DURABLE)
        finished_calls, mapped_calls = _calls(markers / FINISHED), _calls(markers / MAPPED)
        mapped_logs = [_try_logs(home, MAPPED, "long_pair", 2, i) for i in (0, 1)]
        finished_log = _try_logs(home, FINISHED, "long_body", 2)
        retry_log = _try_logs(home, DURABLE, "long_body", 2)
        off_retry_log = _try_logs(home, NOT_DURABLE, "long_body", 2)
        report = (f"states {states}; durable calls {durable_calls}; not durable calls {off_calls}; "
                  f"finished calls {finished_calls}; mapped calls {mapped_calls}\n"
                  f"durable try 2 log:\n{retry_log[-3000:]}\n\n"
                  + "".join(f"mapped [{i}] try 2 log:\n{log[-2500:]}\n\n" for i, log in enumerate(mapped_logs))
                  + airflow.diagnostics())

        assert states == dict.fromkeys(DAGS, "success"), report
        # Durable: the body ran once, to the end, and the retry said what it re-attached to.
        assert len(durable_calls["start"]) == 1 and durable_calls["end"] == durable_calls["start"], report
        assert "Re-attached to Ray task" in retry_log and "submitted by try 1" in retry_log, report
        assert "body" in retry_log and "done" in retry_log, report  # the Ray task's own output, streamed
        # Not durable: the lease cancelled the orphan (it never ended) and the retry ran the body again.
        assert len(off_calls["start"]) == 2, report
        assert len(off_calls["end"]) == 1, report
        assert "Re-attached" not in off_retry_log, report
        # The re-attached try's XCom (Ray XCom backend) names the checkpoint the Ray worker wrote.
        row = api.ok("GET", f"/api/v2/dags/{DURABLE}/dagRuns/{runs[DURABLE]}/taskInstances/long_body/"
                            "xcomEntries/return_value")
        assert "ray-checkpoints" in json.dumps(row), f"{row}\n\n{report}"
        # Finished before the retry came: its held result is taken, the body is not run again.
        assert len(finished_calls["start"]) == 1 and finished_calls["end"] == finished_calls["start"], report
        assert "Re-attached to Ray task" in finished_log, report
        # Mapped, multiple_outputs: each instance's retry re-attached to its own Ray task (check_all got both).
        assert len(mapped_calls["start"]) == 2 and mapped_calls["end"] == mapped_calls["start"], report
        for index, log in enumerate(mapped_logs):
            assert f"Re-attached to Ray task {MAPPED}.long_pair[{index}]" in log, f"map {index}:\n{log[-3000:]}"
        for line in retry_log.splitlines():
            with contextlib.suppress(ValueError):
                event = str(json.loads(line).get("event", ""))
                if "Re-attached" in event or "body" in event or "Reconnecting" in event:
                    print(f"durable try 2: {event[:300]}")
        print(f"\n{database}: killed {killed - triggered:.1f}s after trigger; runs took "
              f"{time.time() - triggered:.1f}s")
        # [ray] preload_modules (on by default): a task process, a fork of the scheduler's, starts with Ray
        # loaded, even for a DAG file that never imports it.
        probe = api.trigger("preload_probe")
        assert airflow.wait("preload_probe", lambda: api.run_state("preload_probe", probe), 120) == "success"
        loaded = api.ok("GET", f"/api/v2/dags/preload_probe/dagRuns/{probe}/taskInstances/loaded/xcomEntries/"
                               "return_value?deserialize=true")["value"]
        assert "ray" in json.dumps(loaded) and "airflow_ray_provider.operators.ray" in json.dumps(loaded), loaded
    except TopologyError as exc:
        pytest.fail(str(exc))
    finally:
        airflow.stop()


# -- the record a try leaves, and the decision a later try makes from it (no scheduler) -------------
def _operator(fn, **kwargs):
    from airflow.sdk import DAG

    from airflow_ray_provider.operators.ray import RayPythonOperator

    with DAG("durable_units", schedule=None, start_date=__import__("pendulum").datetime(2024, 1, 1)):
        op = RayPythonOperator(task_id="unit", python_callable=fn, op_args=[3], num_cpus=0, retries=1, **kwargs)
    op._ray_identity = {"run_id": "manual__1", "map_index": -1, "try_number": 2, "is_mapped": False, "context": {}}
    return op


def _times_ten(x: int, sleep_s: float = 3.0) -> int:
    import time

    time.sleep(sleep_s)
    return x * 10


def test_run_records_are_signed_for_their_task_instance_only() -> None:
    from airflow_ray_provider.operators.durable import RunRecord, check_run_record, run_record
    from airflow_ray_provider.xcom.reference import Origin

    origin = Origin("d", "t", "r", -1)
    record = run_record(origin, "ray_default", "ns", 0, "d/r/t/-1/1/abcd", "f" * 64, 1)
    assert check_run_record(record, origin, "ray_default") == RunRecord("ray_default", "ns", 0, "d/r/t/-1/1/abcd",
                                                                        "f" * 64, 1)
    for field, value in (("key", "other/key"), ("shard", 1), ("namespace", "x"), ("fingerprint", "0" * 64),
                         ("try_number", 2), ("signature", "hmac-sha256:" + "0" * 64)):
        why = check_run_record({**record, field: value}, origin, "ray_default")
        assert isinstance(why, str) and ("not signed by this deployment" in why or "cannot be checked" in why), why
    copied = check_run_record(record, Origin("d", "t", "r", 3), "ray_default")
    assert isinstance(copied, str) and "copied from another task instance" in copied
    assert "now uses 'other'" in check_run_record(record, origin, "other")
    assert "not a run record" in check_run_record("d/r/t/-1/1/abcd", origin, "ray_default")
    assert "malformed" in check_run_record({"v": 1, "key": "k"}, origin, "ray_default")


def test_a_later_try_reattaches_only_to_the_same_call(ray_cluster: str) -> None:
    from airflow_ray_provider.operators.durable import run_record

    first = _operator(_times_ten)
    record = first.submit_job({})
    try:
        assert first.get_job_status(record, {}) == "RUNNING"
        # The same call in a later try re-attaches and gets the result without running the body again.
        later = _operator(_times_ten)
        assert later.get_job_status(record, {}) == "RUNNING"
        assert later.poll_until_complete(record, {}) == 30
        assert later.get_job_status(record, {}) == "SUCCEEDED"
        # Other inputs: not the same call, so a new Ray task is submitted (and the old result is let go).
        changed = _operator(_times_ten)
        changed.op_args = [4]
        assert changed.get_job_status(record, {}) == "CHANGED"
        # A record naming a key nobody holds: submit anew.
        gone = run_record(later._origin(), "ray_default", record["namespace"], record["shard"], "no/such/key",
                          record["fingerprint"], 1)
        assert later.get_job_status(gone, {}) == "UNKNOWN"
        assert _operator(_times_ten).get_job_status({**record, "key": "x"}, {}) == "UNTRUSTED"
    finally:
        first._ray_run.release()


def test_a_later_try_takes_the_run_over_before_it_reads_its_state(ray_cluster: str) -> None:
    """The retry's status check also renews the run's lease, so the reaper cannot cancel the run it found
    running before the re-attach. Without it, a retry that came near the end of the lease (possible under load)
    found the Ray task running and then failed with it cancelled; the likeliest cause of a CI failure where a
    mapped instance's body never ended and its retry ran nothing (that run's logs were not kept)."""
    import time

    first = _operator(_times_ten, op_kwargs={"sleep_s": 10.0})
    record = first.submit_job({})
    try:
        first._ray_run.set_lease(3.0)  # the submitting try died: nobody polls, and its lease is nearly up
        time.sleep(1.5)
        later = _operator(_times_ten, op_kwargs={"sleep_s": 10.0})
        assert later.get_job_status(record, {}) == "RUNNING"
        time.sleep(4.0)  # past the dead try's lease; the reaper looks every second
        assert first._ray_run.state()["state"] == "running"
        assert later.poll_until_complete(record, {}) == 30
    finally:
        first._ray_run.release()


def test_durable_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="durable must be True or False, got 'yes'"):
        _operator(_times_ten, durable="yes")
