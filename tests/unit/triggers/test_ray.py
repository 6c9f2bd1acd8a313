"""``RayRunTrigger`` without a cluster: what the trigger row stores, and what the triggerer imports."""

from __future__ import annotations

import json
import subprocess
import sys

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
