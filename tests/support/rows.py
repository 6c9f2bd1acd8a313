"""What a finished ``dag.test()`` run left in the metadata DB: task states and XCom rows.

``stored`` is the raw JSON a row holds (what the UI and REST API read); ``value_of`` is what a plain
task or ``ti.xcom_pull`` gets for it through the Ray XCom backend (fetched from Ray if it is a reference);
``xcom_value`` reads a row the way the default backend wrote it.
"""

from __future__ import annotations

from typing import Any

RETURN_VALUE = "return_value"


def ti_states(dag_run: Any) -> dict[tuple[str, int], str | None]:
    """``{(task_id, map_index): state}`` for a finished run."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state).where(
                TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
            )
        ).all()
    return {(t, m): (str(s.value) if hasattr(s, "value") else s) for t, m, s in rows}


def task_states(dag_run: Any) -> dict[str, str | None]:
    """``{task_id: state}`` (for runs without mapped tasks, or where any instance's state will do)."""
    return {task_id: state for (task_id, _), state in ti_states(dag_run).items()}


def tries(dag_run: Any) -> dict[str, int]:
    """``{task_id: try_number}`` of the unmapped tasks of a finished run."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return dict(session.execute(select(TaskInstance.task_id, TaskInstance.try_number).where(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id,
            TaskInstance.map_index == -1)).all())


def stored(dag_id: str, run_id: str, task_id: str, key: str = RETURN_VALUE, map_index: int = -1) -> Any:
    """The raw JSON the metadata DB holds for one XCom."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.execute(select(XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
            XComModel.key == key, XComModel.map_index == map_index)).scalar_one()


def xcom_keys(dag_run: Any) -> list[tuple[str, str]]:
    """``(task_id, key)`` of the unmapped XCom rows of a run."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return list(session.execute(select(XComModel.task_id, XComModel.key).where(
            XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id,
            XComModel.map_index == -1)).all())


def value_of(raw: Any) -> Any:
    """What a plain task or ``ti.xcom_pull`` gets for a stored XCom through the Ray XCom backend."""
    from airflow_ray_provider.xcom.backend import RayXComBackend

    return RayXComBackend.deserialize_value(type("Row", (), {"value": raw})())


def pulled(dag_run: Any, task_id: str, key: str = RETURN_VALUE, map_index: int = -1) -> Any:
    """``value_of`` the row of ``task_id`` in a finished run."""
    return value_of(stored(dag_run.dag_id, dag_run.run_id, task_id, key, map_index))


def xcom_value(dag_run: Any, task_id: str, key: str = RETURN_VALUE, map_index: int = -1) -> Any:
    """The stored XCom of a finished run, read as the default backend wrote it (JSON)."""
    from airflow.models.xcom import XComModel

    raw = stored(dag_run.dag_id, dag_run.run_id, task_id, key, map_index)
    return XComModel.deserialize_value(type("R", (), {"value": raw})())
