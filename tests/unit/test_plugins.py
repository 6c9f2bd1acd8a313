"""``[ray] preload_modules``: the scheduler imports Ray for the task processes it forks (plugins.py).

Each case runs in a fresh interpreter, whose ``sys.modules`` starts without Ray. The end-to-end check (a
real scheduler's task process starts with Ray loaded) is in tests/system/operators/test_durable.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from airflow.jobs.job import Job
from airflow_ray_provider.plugins import preload_for_task_processes
sys.argv = [sys.argv[0], *{argv!r}]
job = Job()  # Airflow calls the listeners from here too, as in a real component
job.job_type = {job_type!r}
loaded = preload_for_task_processes(job)
print(json.dumps({{"loaded": loaded, "ray": "ray" in sys.modules}}))
"""


def _probe(argv: list[str], job_type: str | None, preload: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW__RAY__PRELOAD_MODULES"}
    if preload is not None:
        env["AIRFLOW__RAY__PRELOAD_MODULES"] = preload
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, job_type=job_type)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("argv", "job_type"), [(["scheduler"], None), (["whatever"], "SchedulerJob")])
def test_the_scheduler_preloads_ray_and_the_operator(argv: list[str], job_type: str | None) -> None:
    out = _probe(argv, job_type)
    assert out["ray"] is True
    assert {"ray", "airflow_ray_provider.operators.ray"} <= set(out["loaded"])


@pytest.mark.parametrize(("argv", "job_type"), [(["triggerer"], None), (["dag-processor"], "DagProcessorJob"),
                                                (["api-server"], None)])
def test_other_components_load_nothing(argv: list[str], job_type: str | None) -> None:
    assert _probe(argv, job_type) == {"loaded": [], "ray": False}


def test_it_can_be_switched_off() -> None:
    assert _probe(["scheduler"], None, preload="False") == {"loaded": [], "ray": False}
