"""``load_result``: a past task's result in a notebook or script, from Ray or from its checkpoint.

Reads the metadata DB (so it runs wherever Airflow is configured), then gets the value
the way a downstream task would: from the XCom row, from Ray's object store when the row
holds a reference, or from the task's durable checkpoint when Ray no longer has it.
"""

from __future__ import annotations

from typing import Any

from airflow_ray_provider.config import DEFAULT_CONN_ID
from airflow_ray_provider.exceptions import ResultNotFound
from airflow_ray_provider.xcom.reference import is_reference, parse_reference


def load_result(dag_id: str, task_id: str, run_id: str | None = None, map_index: int = -1,
                key: str = "return_value", ray_conn_id: str = DEFAULT_CONN_ID) -> Any:
    """The result of ``task_id`` in ``run_id`` (default: the DAG's latest successful run).

    >>> from airflow_ray_provider.xcom.results import load_result
    >>> frame = load_result("xgboost_higgs", "load_data")            # latest successful run
    >>> booster = load_result("xgboost_higgs", "train", run_id="manual__2026-11-24T05:00:00+00:00")
    """
    from airflow.models.xcom import XComModel
    from airflow.sdk.bases.xcom import BaseXCom
    from airflow.utils.session import create_session
    from sqlalchemy import select

    run_id = run_id or latest_successful_run(dag_id)
    with create_session() as session:
        raw = session.execute(select(XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
            XComModel.key == key, XComModel.map_index == map_index)).scalar_one_or_none()
    if raw is not None:
        if is_reference(raw):
            from airflow_ray_provider.xcom.backend import Read, check_origin, fetch

            ref = parse_reference(raw)
            check_origin(ref, Read(dag_id, task_id, run_id, map_index, key))
            return fetch(ref)
        return BaseXCom.deserialize_value(type("Row", (), {"value": raw})())
    return _from_checkpoint(dag_id, task_id, run_id, map_index, key, ray_conn_id)


def latest_successful_run(dag_id: str) -> str:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from sqlalchemy import select

    with create_session() as session:
        run_id = session.execute(
            select(DagRun.run_id).where(DagRun.dag_id == dag_id, DagRun.state == DagRunState.SUCCESS)
            .order_by(DagRun.end_date.desc()).limit(1)).scalar_one_or_none()
    if run_id is None:
        raise ResultNotFound(f"DAG {dag_id!r} has no successful run; pass run_id= to read another one")
    return run_id


def _from_checkpoint(dag_id: str, task_id: str, run_id: str, map_index: int, key: str, ray_conn_id: str) -> Any:
    """No XCom row (a default XCom backend's row was cleared, or the task pushed none): try the checkpoint."""
    from airflow_ray_provider.cluster.checkpoint import TaskCheckpoint, TaskKey
    from airflow_ray_provider.exceptions import CheckpointNotFound
    from airflow_ray_provider.storage import store_for

    where = f"dag {dag_id!r}, task {task_id!r}, run {run_id!r}, map index {map_index}, key {key!r}"
    if key != "return_value":
        raise ResultNotFound(f"No XCom for {where}")
    store, _ = store_for(ray_conn_id)
    try:
        return TaskCheckpoint(store, TaskKey(dag_id, run_id, task_id, map_index)).load_result()
    except CheckpointNotFound:
        raise ResultNotFound(f"No XCom and no checkpoint (under {store.root}) for {where}") from None
