"""Every tier runs in an isolated Airflow home; shared fixtures come from tests/support/fixtures.py.

The tiers (README, "Testing"): ``tests/unit`` needs no Ray and no metadata DB, ``tests/integration``
shares one Ray head, one S3 server and one migrated DB across the session and runs DAGs in-process with
``dag.test()``, ``tests/system`` starts what needs its own processes (the scheduler and triggerer, the API
server and a browser, network namespaces, Celery, heads that are killed or restarted, other versions).

The environment is set here, before anything imports Airflow, so every test and every subprocess it
starts sees the same isolated home. The Ray XCom backend is the session's backend (Airflow chooses it
when it is imported); tests of the default backend's path say so (tests/integration/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY_XCOM_BACKEND = "airflow_ray_provider.xcom.RayXComBackend"
_HOME = Path(tempfile.mkdtemp(prefix="airflow-ray-tests-"))
os.environ.update(
    AIRFLOW_HOME=str(_HOME),
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "tests" / "dags"),
    AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{_HOME}/airflow.db",
    AIRFLOW__CORE__UNIT_TEST_MODE="False",
    AIRFLOW__CORE__XCOM_BACKEND=RAY_XCOM_BACKEND,
    RAY_USAGE_STATS_ENABLED="0",
    # Tests run the XCom gc themselves; the background one is turned on where it is tested.
    AIRFLOW__RAY__XCOM_GC_INTERVAL="-1",
)
os.environ.pop("AIRFLOW_CONN_RAY_DEFAULT", None)
# Two DAG bundles: the tests' DAGs, and the example DAGs as users get them (dag.test() runs a DAG only from a
# bundle it can parse it from). Deployments the tests start get their own bundle list (scripts/local_topology.py).
_LOCAL_BUNDLE = "airflow.dag_processing.bundles.local.LocalDagBundle"
os.environ["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps([
    {"name": "dags-folder", "classpath": _LOCAL_BUNDLE, "kwargs": {}},
    {"name": "example-dags", "classpath": _LOCAL_BUNDLE, "kwargs": {"path": str(ROOT / "example_dags")}},
])

pytest_plugins = ["tests.support.fixtures"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A module's tests share its module-scoped fixtures in one lane through --dist loadfile (Makefile). The
    # xdist_group mark would look like another way, but pytest 9.2 with pytest-xdist 3.8 ignores it without a
    # word (pytest-dev/pytest-xdist#1386): each lane then starts the module's heads and servers again.
    marked = [item.nodeid for item in items if item.get_closest_marker("xdist_group")]
    if marked:
        raise pytest.UsageError(f"{marked[0]} is marked xdist_group, which the lanes ignore here (pytest-xdist "
                                "#1386); a module's tests stay in one lane already (--dist loadfile)")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HOME, ignore_errors=True)


# -- where the time goes: each test's wall time and the machine's CPU time while it ran -----------------------
def _machine_cpu_s() -> float:
    """CPU seconds the whole machine spent busy since boot (/proc/stat), or 0 where there is no /proc."""
    try:
        fields = open("/proc/stat").readline().split()[1:]
    except OSError:
        return 0.0
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    started, cpu, at = time.monotonic(), _machine_cpu_s(), time.time()
    try:
        return (yield)
    finally:
        report = os.environ.get("AIRFLOW_RAY_TEST_CPU_REPORT")
        if report:  # machine-wide: exact when tests run one at a time, shared when lanes overlap
            with open(report, "a") as out:
                lane = os.environ.get("PYTEST_XDIST_WORKER", "main")  # which lane, and when: the lanes' timeline
                out.write(f"{item.nodeid}\t{time.monotonic() - started:.1f}\t{_machine_cpu_s() - cpu:.1f}\t"
                          f"{lane}\t{at:.0f}\n")
