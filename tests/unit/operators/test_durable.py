"""Durable ``@task.ray``: the record a try leaves in the task state store, and the option's validation."""

from __future__ import annotations

import pendulum
import pytest
from airflow.sdk import DAG

from airflow_ray_provider.operators.ray import RayPythonOperator


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


def test_durable_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="durable must be True or False, got 'yes'"):
        with DAG("durable_units", schedule=None, start_date=pendulum.datetime(2024, 1, 1)):
            RayPythonOperator(task_id="unit", python_callable=len, durable="yes")
