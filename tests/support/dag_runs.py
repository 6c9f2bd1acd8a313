"""Run DAGs for tests: in a fresh interpreter where the process boundary matters, on an embedded head of the
test's own, and say why a run failed.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from airflow_ray_provider.local_cluster import LocalRayCluster
from tests.support import ROOT
from tests.support.rows import pulled, task_states

ERROR_LINE = re.compile(r"Traceback|Error|Exception|\[error|failed", re.I)

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


# The gateway DAG (tests/dags/gateway_dags.py) in an interpreter where any import of Ray fails: what an Airflow
# worker next to a remote cluster is. Its own script, not PRELUDE: that imports DAG files of Ray-driver tests.
WITHOUT_RAY = """
import json, sys
sys.modules["ray"] = None
from tests.dags import gateway_dags
from tests.support.rows import ti_states, xcom_value
dr = getattr(gateway_dags, sys.argv[1]).test()
print("RESULT " + json.dumps({"states": sorted(set(ti_states(dr).values())), "plain": xcom_value(dr, "plain"),
                              "ray_loaded": [m for m in sys.modules if (m == "ray" or m.startswith("ray."))
                                             and sys.modules[m] is not None]}), flush=True)
"""
GATEWAY_FLOW_PLAIN = {"total": 3 * sum(i * i for i in range(100)), "squares": [1, 4, 9], "deferred": 1007}


def run_gateway_flow_without_ray(env: dict[str, str], timeout: float = 360,
                                 dag: str = "gateway_flow_dag") -> dict[str, Any]:
    """Run ``dag`` of tests/dags/gateway_dags.py (its task ``plain`` reports) in a fresh interpreter that cannot
    import Ray; what it found (``RESULT``)."""
    proc = subprocess.run([sys.executable, "-c", WITHOUT_RAY, dag], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, why(proc.stdout + proc.stderr)
    return json.loads(results[-1])


def session_ray_conn(**extra: object) -> dict[str, str]:
    """The environment for a subprocess: the session's ``ray_default`` with ``extra`` over its extras."""
    current = json.loads(os.environ["AIRFLOW_CONN_RAY_DEFAULT"])
    current["extra"] = {**current["extra"], **extra}
    return {"AIRFLOW_CONN_RAY_DEFAULT": json.dumps(current)}


def why(output: str, limit: int = 9000, tail: int = 3000) -> str:
    """What an assertion shows of a run's output: its error lines, each with the lines after it, then the tail.

    A task that failed early (a try that was retried, an upstream) says why far above the end of a long
    output, which is all a plain ``output[-N:]`` would show. When the error lines are too many, the first and
    the last of them are shown.
    """
    lines = output.splitlines()
    picked: dict[int, None] = {}
    for i, line in enumerate(lines):
        if ERROR_LINE.search(line):
            picked.update(dict.fromkeys(range(i, min(i + 6, len(lines)))))
    errors, budget = "\n".join(lines[i] for i in picked), limit - tail
    if len(errors) > budget:  # the first error (often an expected one: a killed try) and the last, which failed
        errors = f"{errors[: budget // 2]}\n[... error lines left out ...]\n{errors[-budget // 2:]}"
    return f"--- error lines of the output ---\n{errors}\n--- its last {tail} characters ---\n{output[-tail:]}"


class EmbeddedRun(NamedTuple):
    dag_run: Any
    output: str  # stdout, stderr and the log records of the run
    pulled: list[Any]  # the return values asked for, read while the head still held them


def run_on_embedded_head(dag: Any, run_conf: dict[str, Any], airflow_home: Path, capfd: pytest.CaptureFixture[str],
                         caplog: pytest.LogCaptureFixture, pull: Sequence[str] = ()) -> EmbeddedRun:
    """``dag.test()`` on the embedded head of ``airflow_home`` (for DAGs that restart it), which every task must
    finish; the head is stopped afterwards, whatever happened."""
    try:
        dag_run = dag.test(run_conf=run_conf)
        captured = capfd.readouterr()
        output = captured.out + captured.err + caplog.text  # a log line can reach stderr late
        assert set(task_states(dag_run).values()) == {"success"}, why(output)
        return EmbeddedRun(dag_run, output, [pulled(dag_run, task_id) for task_id in pull])
    finally:
        LocalRayCluster(airflow_home / "ray").stop()
