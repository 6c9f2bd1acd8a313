"""Run Python (usually a ``dag.test()``) in a fresh interpreter, for tests where the process boundary matters.

Most tests run DAGs in the pytest process; this is for the rest: a signal sent to the process running the
tasks, another Python or Ray version, a process whose environment must differ from the session's. The
subprocess shares the session's Airflow home, metadata DB and connections, and reports what it found by
printing ``RESULT {json}`` (``emit``). A fresh interpreter that imports Airflow and Ray and warms up
``dag.test()`` costs about a minute on a loaded 2-core machine: use it only where the boundary is the point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from typing import Any

from tests.support import ROOT

PRELUDE = """
import json, sys
from tests.dags import checkpoint_dags, xcom_dags
from tests.support.rows import pulled, task_states, ti_states, tries
def emit(**values):
    print("RESULT " + json.dumps(values, default=str), flush=True)
"""


def start_py(code: str, *, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Like :func:`run_py`, but in the background, for tests that act on the run while it goes."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result_of(proc: subprocess.Popen[str], timeout: float = 900) -> tuple[dict[str, Any], str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"no result within {timeout:.0f}s: {output[-6000:]}") from None
    found = re.findall(r"^RESULT (.*)$", output, re.M)
    assert proc.returncode == 0 and found, output[-6000:]
    return json.loads(found[-1]), output


def run_py(code: str, *, env: dict[str, str] | None = None, timeout: float = 900) -> tuple[dict[str, Any], str]:
    """Run ``code`` in a fresh interpreter; return what it ``emit``-ted and its output."""
    return result_of(start_py(code, env=env), timeout)


def session_ray_conn(**extra: object) -> dict[str, str]:
    """The environment for a subprocess: the session's ``ray_default`` with ``extra`` over its extras."""
    current = json.loads(os.environ["AIRFLOW_CONN_RAY_DEFAULT"])
    current["extra"] = {**current["extra"], **extra}
    return {"AIRFLOW_CONN_RAY_DEFAULT": json.dumps(current)}
