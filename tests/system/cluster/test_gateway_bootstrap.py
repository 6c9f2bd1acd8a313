"""No hands on the head (issue 24): on a stock Ray head (Ray and data libraries only, no provider and no
cloudpickle: `make stock-ray`), the first task through a connection with ``gateway_url`` and ``dashboard_url``
brings the gateway up through Ray's Jobs API, and later processes find it. The Airflow processes cannot import Ray.

Its own head, with the dashboard (which serves the Jobs API), because the test submits a job that stays.
"""

from __future__ import annotations

import json
import os
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
        second = run_gateway_flow_without_ray(env)  # finds it
        assert second == first

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        jobs = httpx.get(f"{state.dashboard_url}/api/jobs/", headers=headers, timeout=60).json()
        ours = [j for j in jobs if str(j.get("submission_id") or "").startswith(JOB_PREFIX)]
        assert [(j["submission_id"], j["status"]) for j in ours] == [(gateway_package().submission_id, "RUNNING")]
        # The job carries the key derived for the gateway, never the deployment's secret itself.
        env_vars = ours[0]["runtime_env"]["env_vars"]
        assert list(env_vars) == ["AIRFLOW_RAY_GATEWAY_KEY"] and len(env_vars["AIRFLOW_RAY_GATEWAY_KEY"]) == 64
