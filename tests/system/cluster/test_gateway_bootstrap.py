"""No hands on the head (issue 24): on a stock Ray head (Ray and data libraries only, no provider and no
cloudpickle: `make stock-ray`), the first task through a connection with ``gateway_url`` and ``dashboard_url``
brings the gateway up through Ray's Jobs API, and later processes find it (one of them with a task that names
py_modules of its own, which must not drop the provider's). The Airflow processes cannot import Ray.

Its own head, with the dashboard (which serves the Jobs API), because the test submits a job that stays.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import httpx
import pytest

from airflow_ray_provider.gateway_bootstrap import JOB_PREFIX, gateway_package
from airflow_ray_provider.local_cluster import free_ports
from tests.dags import gateway_dags
from tests.support import ROOT
from tests.support.dag_runs import GATEWAY_FLOW_PLAIN, run_gateway_flow_without_ray
from tests.support.heads import head_from

pytestmark = [pytest.mark.usefixtures("airflow_db"), pytest.mark.timeout(900)]

STOCK = Path(os.environ.get("AIRFLOW_RAY_STOCK_VENV") or ROOT / ".venv-stock-ray")


def test_the_first_task_brings_the_gateway_up_on_a_stock_head(tmp_path_factory: pytest.TempPathFactory,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A job's entrypoint runs `python` from the head's PATH: on a cluster's image, its own Python.
    monkeypatch.setenv("PATH", f"{STOCK / 'bin'}{os.pathsep}{os.environ['PATH']}")
    hint = "`make stock-ray` builds it: Ray and data libraries, no Airflow, no provider"
    with head_from(STOCK, tmp_path_factory.mktemp("gateway-head"), hint, num_cpus=2,
                   include_dashboard=True) as (cluster, state):
        (port,) = free_ports(1)
        token = cluster.auth_token()
        conn = {"conn_type": "ray", "password": token,
                "extra": {"gateway_url": f"http://127.0.0.1:{port}", "dashboard_url": state.dashboard_url,
                          "namespace": "stock-gateway"}}
        env = {f"AIRFLOW_CONN_{gateway_dags.CONN.upper()}": json.dumps(conn)}
        first = run_gateway_flow_without_ray(env)  # brings the gateway up
        assert first == {"states": ["success"], "plain": GATEWAY_FLOW_PLAIN, "ray_loaded": []}, first
        # Another process finds it; a task with py_modules of its own still gets the provider's code. A task's
        # py_modules must be URIs (Ray uploads local folders only for a job), here one uploaded as users of the
        # Jobs API do.
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w") as archive:
            archive.writestr("gwhelper/__init__.py", "VALUE = 5\n")
        name = f"_ray_pkg_{hashlib.sha1(zipped.getvalue(), usedforsecurity=False).hexdigest()}.zip"
        put = httpx.put(f"{state.dashboard_url}/api/packages/gcs/{name}", content=zipped.getvalue(),
                        headers=headers, timeout=60)
        assert put.status_code == 200, put.text
        second = run_gateway_flow_without_ray({**env, "AIRFLOW_RAY_TEST_OWN_MODULE": f"gcs://{name}"},
                                              dag="gateway_own_modules_dag")
        assert second == {"states": ["success"], "plain": {"own_module": 5}, "ray_loaded": []}, second

        jobs = httpx.get(f"{state.dashboard_url}/api/jobs/", headers=headers, timeout=60).json()
        ours = [j for j in jobs if str(j.get("submission_id") or "").startswith(JOB_PREFIX)]
        assert [(j["submission_id"], j["status"]) for j in ours] == [(gateway_package().submission_id, "RUNNING")]
        # The job carries the key derived for the gateway, never the deployment's secret itself.
        env_vars = ours[0]["runtime_env"]["env_vars"]
        assert list(env_vars) == ["AIRFLOW_RAY_GATEWAY_KEY"] and len(env_vars["AIRFLOW_RAY_GATEWAY_KEY"]) == 64
