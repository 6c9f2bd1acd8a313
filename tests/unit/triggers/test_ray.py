"""``RayRunTrigger`` without a cluster: what the trigger row stores, and what the triggerer imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from airflow_ray_provider.triggers import RayRunTrigger, sign_run

CONN = "ray_default"


def test_serialize_round_trips() -> None:
    trigger = RayRunTrigger(ray_conn_id=CONN, namespace="ns", shard=1, key="k", task_label="t",
                            signature=sign_run(CONN, "ns", 1, "k"))
    path, kwargs = trigger.serialize()
    assert path == "airflow_ray_provider.triggers.ray.RayRunTrigger"
    assert RayRunTrigger(**kwargs).serialize() == (path, kwargs)
    assert json.loads(json.dumps(kwargs)) == kwargs  # what the trigger row stores


def test_the_triggerer_side_does_not_import_ray() -> None:
    """The trigger and its client load no Ray: only the watcher subprocess is a Ray driver."""
    code = ("import sys\n"
            "from airflow_ray_provider.triggers import RayRunTrigger, sign_run\n"
            "import airflow_ray_provider.triggers.watcher\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_resume_event_is_bound_to_the_task_instance_that_deferred() -> None:
    """A signed event of another task instance (copied into ``next_kwargs`` with a DB edit) is refused."""
    from airflow_ray_provider.exceptions import SigningError
    from airflow_ray_provider.operators.ray import check_event

    key = "dag/run_1/produce/-1/1/ab12cd34"
    event = {"status": "done", "state": "finished", "namespace": "ns", "shard": 0, "key": key,
             "signature": sign_run(CONN, "ns", 0, key)}
    assert check_event(event, CONN, "dag.produce", "dag/run_1/produce/-1/") == event
    for other in ("dag/run_1/consume/-1/", "dag/run_2/produce/-1/", "dag/run_1/produce/0/", "other/run_1/produce/-1/"):
        with pytest.raises(SigningError, match=r"event for Ray key 'dag/run_1/produce/-1/1/ab12cd34', which another "
                                               r"task instance submitted"):
            check_event(event, CONN, "x", other)
    with pytest.raises(SigningError, match="that this deployment did not sign"):
        check_event({**event, "key": "dag/run_1/produce/-1/2/ab12cd34"}, CONN, "dag.produce", "dag/run_1/produce/-1/")
