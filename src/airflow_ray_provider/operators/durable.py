"""Durable ``@task.ray``: the record a try leaves in the task state store, and how long a run waits for a retry.

A try records what it submitted (owner shard and key, the fingerprint of the callable and its
inputs, its try number) in Airflow 3.3's task state store before it waits, so that a later try of
the same task instance re-attaches to the Ray task instead of running the callable again (see
``RayPythonOperator.execute_callable`` and Airflow's ``ResumableJobMixin``).

The state store is a table in the metadata DB, editable by whoever can write there, so the
record is signed with the deployment's secret over every field and over the task instance it
belongs to. A record that fails the check, or one copied from another task instance, is refused
and a new Ray task is submitted: a string from the DB never chooses which Ray object a task reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from airflow_ray_provider.cluster import signing
from airflow_ray_provider.config import secret_key
from airflow_ray_provider.exceptions import SigningError
from airflow_ray_provider.xcom.reference import Origin

RECORD_VERSION = 1
STATE_KEY = "airflow_ray_run"  # the task state store key (ResumableJobMixin.external_id_key)

# Airflow notices a try whose process died without a word (SIGKILL, OOM kill, lost host) only when its
# heartbeats stop: [scheduler] task_instance_heartbeat_timeout, checked every ..._detection_interval.
# Scheduling the retry then takes a loop or two more.
_SCHEDULING_SLACK_S = 60.0


@dataclass(frozen=True)
class RunRecord:
    """What one try submitted, as a later try reads it back."""

    conn_id: str
    namespace: str
    shard: int
    key: str
    fingerprint: str
    try_number: int


def _payload(origin: Origin, record: RunRecord) -> dict[str, Any]:
    return {"v": RECORD_VERSION, "origin": [origin.dag_id, origin.task_id, origin.run_id, origin.map_index],
            **asdict(record)}


def run_record(origin: Origin, conn_id: str, namespace: str, shard: int, key: str, fingerprint: str,
               try_number: int) -> dict[str, Any]:
    """The JSON the task state store keeps for this try's Ray task, signed for ``origin`` only."""
    record = RunRecord(conn_id, namespace, shard, key, fingerprint, try_number)
    return {"v": RECORD_VERSION, **asdict(record),
            "signature": signing.sign(secret_key(), signing.RUN_RECORD, _payload(origin, record))}


def check_run_record(value: Any, origin: Origin, conn_id: str) -> RunRecord | str:
    """The record if it is well formed, signed by this deployment for ``origin`` and ``conn_id``; else why not."""
    if not isinstance(value, dict):
        return f"the task state store holds a {type(value).__name__} under {STATE_KEY!r}, not a run record"
    if value.get("v") != RECORD_VERSION:
        return f"the run record has version {value.get('v')!r}, not {RECORD_VERSION}"
    try:
        record = RunRecord(conn_id=str(value["conn_id"]), namespace=str(value["namespace"]),
                           shard=int(value["shard"]), key=str(value["key"]), fingerprint=str(value["fingerprint"]),
                           try_number=int(value["try_number"]))
    except (KeyError, TypeError, ValueError) as exc:
        return f"the run record is malformed ({type(exc).__name__}: {exc})"
    try:
        valid = signing.verify(secret_key(), signing.RUN_RECORD, _payload(origin, record), value.get("signature"))
    except SigningError as exc:
        return f"the run record cannot be checked: {exc}"
    if not valid:
        return (f"the run record for key {record.key!r} is not signed by this deployment for task "
                f"{origin.label(None)} (edited, or copied from another task instance)")
    if record.conn_id != conn_id:
        return f"the run record is for Ray connection {record.conn_id!r}, and this task now uses {conn_id!r}"
    return record


def reattach_window(task: Any, try_number: int) -> float:
    """Seconds a durable run may go unpolled after its try died and still be re-attached to.

    Zero when no retry can come (this is the last try). Otherwise Airflow's heartbeat timeout (how
    long until it declares the dead try failed), plus this try's retry delay (capped as Airflow caps
    it, by ``max_retry_delay``), plus a minute of scheduling. The owner actor reaps the run only after
    the connection's lease plus this window, so a retry that comes at all finds its Ray task.
    """
    from airflow.configuration import conf

    retries = int(getattr(task, "retries", 0) or 0)
    if try_number > retries:
        return 0.0
    heartbeat = conf.getfloat("scheduler", "task_instance_heartbeat_timeout", fallback=300.0)
    delay = _seconds(getattr(task, "retry_delay", None))
    multiplier = float(getattr(task, "retry_exponential_backoff", 0) or 1.0)
    if multiplier > 0 and multiplier != 1.0:
        # TaskInstance.next_retry_datetime: a delay between min_backoff and twice it (a per-TI jitter).
        delay = 2 * max(delay * multiplier ** max(try_number - 1, 0), 1.0)
    cap = _seconds(getattr(task, "max_retry_delay", None))
    if cap:
        delay = min(delay, cap)
    return heartbeat + delay + _SCHEDULING_SLACK_S


def _seconds(value: Any) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value or 0.0)
