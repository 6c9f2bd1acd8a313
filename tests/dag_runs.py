"""Run DAGs in a subprocess with the Ray XCom backend enabled (it is chosen when Airflow is imported).

The subprocess shares the test session's SQLite metadata DB, Ray head and connections,
and reports what it measured by printing ``RESULT {json}`` (``emit``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "airflow_ray_provider.xcom.RayXComBackend"
# Not importing tests.conftest here: it would make a new Airflow home for the subprocess.
PRELUDE = """
import json, resource, sys
from tests.dags import checkpoint_dags, xcom_dags
def ti_states(dr):
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.utils.session import create_session
    from sqlalchemy import select
    with create_session() as s:
        rows = s.execute(select(TI.task_id, TI.map_index, TI.state).where(
            TI.dag_id == dr.dag_id, TI.run_id == dr.run_id)).all()
    return {(t, m): getattr(st, "value", st) for t, m, st in rows}
def task_states(dr):
    return {t: st for (t, _), st in ti_states(dr).items()}
def pulled(dr, task_id, key="return_value", map_index=-1):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select
    from airflow_ray_provider.xcom.backend import RayXComBackend
    with create_session() as s:
        raw = s.execute(select(XComModel.value).where(
            XComModel.dag_id == dr.dag_id, XComModel.run_id == dr.run_id, XComModel.task_id == task_id,
            XComModel.key == key, XComModel.map_index == map_index)).scalar_one()
    return RayXComBackend.deserialize_value(type("Row", (), {"value": raw})())
def emit(**values):
    print("RESULT " + json.dumps(values, default=str), flush=True)
"""


def session_ray_conn(**extra: object) -> dict[str, str]:
    """The environment for a subprocess: the session's ``ray_default`` with ``extra`` over its extras."""
    current = json.loads(os.environ["AIRFLOW_CONN_RAY_DEFAULT"])
    current["extra"] = {**current["extra"], **extra}
    return {"AIRFLOW_CONN_RAY_DEFAULT": json.dumps(current)}


def start_py(code: str, *, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Like :func:`run_py`, but in the background, for tests that act on the run while it goes."""
    full_env = {**os.environ, "AIRFLOW__CORE__XCOM_BACKEND": BACKEND, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result_of(proc: subprocess.Popen[str], timeout: float = 900) -> tuple[dict[str, Any], str]:
    output, _ = proc.communicate(timeout=timeout)
    found = re.findall(r"^RESULT (.*)$", output, re.M)
    assert proc.returncode == 0 and found, output[-6000:]
    return json.loads(found[-1]), output


def run_py(code: str, *, env: dict[str, str] | None = None, timeout: float = 900) -> tuple[dict[str, Any], str]:
    """Run ``code`` with the Ray XCom backend enabled; return what it ``emit``-ted and its output."""
    return result_of(start_py(code, env=env), timeout)
