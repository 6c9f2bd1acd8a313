"""A head started from a virtualenv with Ray and data libraries only (no Airflow, no provider, no
s3fs: what a rayproject/ray image carries) runs ``@task.ray``, the XCom backend and checkpoints on
S3. The provider ships its cluster-side code itself (``bundle.py``)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT
from tests.support.dag_runs import run_py
from tests.support.heads import head_from
from tests.support.s3server import BUCKET, s3_client

# Each DAG runs in a process of its own: a process joined to a stock head without the shipped code was seen
# to abort (Ray's core, no Python error) when run in the pytest process, which took a whole lane with it.
pytestmark = [pytest.mark.usefixtures("airflow_db"), pytest.mark.timeout(600)]

STOCK = Path(os.environ.get("AIRFLOW_RAY_STOCK_VENV") or ROOT / ".venv-stock-ray")
DAG = """
    from tests.dags import stock_dags
    from airflow_ray_provider.cluster.checkpoint import TaskCheckpoint, TaskKey
    from airflow_ray_provider.storage import make_store
    dr = stock_dags.stock_ray_dag.test()
    states = task_states(dr)
    emit(states=states, where=pulled(dr, "where") if states.get("where") == "success" else None,
         total=pulled(dr, "total") if states.get("total") == "success" else None, run_id=dr.run_id)
"""


# One head per test: once a connection has shipped the code, the cluster's keeper and owners carry it,
# and a later connection without shipping would still work there.
@pytest.fixture
def stock_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    hint = ("`make stock-ray` builds it: Ray, numpy, pandas, pyarrow, fsspec, boto3; no Airflow, no provider, "
            "no s3fs")
    if (STOCK / "bin" / "python").exists():
        probe = subprocess.run(
            [str(STOCK / "bin" / "python"), "-c", "import importlib.util as u, json; print(json.dumps({m: "
             "u.find_spec(m) is not None for m in ('ray', 'pyarrow', 'airflow', 'airflow_ray_provider', 's3fs')}))"],
            capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(probe.stdout) == {"ray": True, "pyarrow": True, "airflow": False,
                                            "airflow_ray_provider": False, "s3fs": False}
    with head_from(STOCK, tmp_path_factory.mktemp("stock-head"), hint, num_cpus=2) as head:
        yield head


def _conn(cluster: Any, state: Any, **extra: Any) -> dict[str, str]:
    return {"AIRFLOW_CONN_RAY_STOCK": json.dumps({
        "conn_type": "ray", "password": cluster.auth_token(),
        "extra": {"address": state.address, "namespace": "stock", "checkpoint_path": f"s3://{BUCKET}/stock",
                  "checkpoint_conn_id": "ckpt_s3", **extra}})}


def test_a_stock_ray_head_runs_tasks_the_xcom_backend_and_s3_checkpoints(stock_head: Any, s3_endpoint: str) -> None:
    cluster, state = stock_head
    result, output = run_py(DAG + """
    ckpt = TaskCheckpoint(make_store(f"s3://{BUCKET}/stock", "ckpt_s3"), TaskKey("stock_ray", dr.run_id, "make"))
    emit(restored=float(ckpt.load_result().sum()), progress=ckpt.load("progress"))
    """.replace("{BUCKET}", BUCKET), env=_conn(cluster, state))
    first = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert set(first["states"].values()) == {"success"}, output[-6000:]
    where = first["where"]
    # The provider's code came with the job (a runtime_env py_module), on the stock Python.
    assert "/runtime_resources/py_modules_files/" in where["provider"], where
    assert where["python"].startswith(str(STOCK)), where
    assert where["airflow"] is False and where["s3fs"] is False
    n = 3_000_000
    assert first["total"] == pytest.approx(n * (n - 1) / 2)
    # The node wrote the checkpoint through pyarrow's S3; the Airflow side (s3fs) reads and verifies it.
    assert result["restored"] == pytest.approx(n * (n - 1) / 2)
    assert result["progress"] == {"step": 1}
    keys = [o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="stock/")["Contents"]]
    assert any(k.endswith("/make/-1/result/manifest.json") for k in keys), keys
    assert any(k.endswith("/make/-1/state/progress/manifest.json") for k in keys), keys


def test_without_shipping_a_stock_node_fails_fast_naming_the_missing_package(stock_head: Any,
                                                                          s3_endpoint: str) -> None:
    cluster, state = stock_head
    result, output = run_py(DAG, env={**_conn(cluster, state, namespace="stock-unshipped"),
                                      "AIRFLOW__RAY__SHIP_CLUSTER_CODE": "False"})
    assert result["states"]["where"] == "failed", output[-6000:]
    assert "airflow_ray_provider" in output and "ship_cluster_code" in output, output[-6000:]
