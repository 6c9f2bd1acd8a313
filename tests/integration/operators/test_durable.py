"""Durable ``@task.ray`` without a scheduler: the decision a later try makes from the record an earlier try left.

The operator's ``ResumableJobMixin`` methods are called as Airflow calls them, against the session head.
The same under the real scheduler, with the try's process SIGKILLed, is tests/system/operators/test_durable.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pendulum
import pytest
from airflow.sdk import DAG

from airflow_ray_provider.operators.durable import run_record
from airflow_ray_provider.operators.ray import RayPythonOperator

# The operator's own return value, as a deployment without the Ray XCom backend gets it (with the backend it
# is a reference to the same result).
pytestmark = pytest.mark.usefixtures("default_xcom_backend")


def _operator(fn, **kwargs):
    with DAG("durable_units", schedule=None, start_date=pendulum.datetime(2024, 1, 1)):
        op = RayPythonOperator(task_id="unit", python_callable=fn, op_args=[3], num_cpus=0, retries=1, **kwargs)
    op._ray_identity = {"run_id": "manual__1", "map_index": -1, "try_number": 2, "is_mapped": False, "context": {}}
    return op


def _times_ten(x: int, sleep_s: float = 3.0, gate: str | None = None) -> int:
    """``x * 10`` after ``sleep_s``, or once the file ``gate`` exists (bounded: the test creates it)."""
    import os
    import time

    if gate is None:
        time.sleep(sleep_s)
    deadline = time.monotonic() + 300
    while gate is not None and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return x * 10


def test_a_later_try_reattaches_only_to_the_same_call(ray_cluster: str, tmp_path: Path) -> None:
    # Running until the test says so, not for a fixed time: a later try's checks took more than 3 s under load
    # (run 27), and the run had ended when the test expected it running.
    gate = {"gate": str(tmp_path / "go")}
    first = _operator(_times_ten, op_kwargs=gate)
    record = first.submit_job({})
    try:
        assert first.get_job_status(record, {}) == "RUNNING"
        # The same call in a later try re-attaches and gets the result without running the body again.
        later = _operator(_times_ten, op_kwargs=gate)
        assert later.get_job_status(record, {}) == "RUNNING"
        (tmp_path / "go").touch()
        assert later.poll_until_complete(record, {}) == 30
        assert later.get_job_status(record, {}) == "SUCCEEDED"
        # Other inputs: not the same call, so a new Ray task is submitted (and the old result is let go).
        changed = _operator(_times_ten, op_kwargs=gate)
        changed.op_args = [4]
        assert changed.get_job_status(record, {}) == "CHANGED"
        # A record naming a key nobody holds: submit anew.
        gone = run_record(later._origin(), "ray_default", record["namespace"], record["shard"], "no/such/key",
                          record["fingerprint"], 1)
        assert later.get_job_status(gone, {}) == "UNKNOWN"
        assert _operator(_times_ten, op_kwargs=gate).get_job_status({**record, "key": "x"}, {}) == "UNTRUSTED"
    finally:
        first._ray_run.release()


def test_a_later_try_takes_the_run_over_before_it_reads_its_state(ray_cluster: str) -> None:
    """The retry's status check also renews the run's lease, so the reaper cannot cancel the run it found
    running before the re-attach. Without it, a retry that came near the end of the lease (possible under load)
    found the Ray task running and then failed with it cancelled; the likeliest cause of a CI failure where a
    mapped instance's body never ended and its retry ran nothing (that run's logs were not kept)."""
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
