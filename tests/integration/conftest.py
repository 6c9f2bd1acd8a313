"""The integration tier: one Ray head, one S3 server and one migrated metadata DB for the whole session.

DAGs run in this process with ``dag.test()`` (warm after the first: seconds, against about a minute for
a fresh interpreter that imports Airflow and Ray), with the Ray XCom backend, as a deployment configures
it. A test runs a DAG in a subprocess only where the process boundary is what it is about (a signal to the
task process, a result outliving the process that submitted it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lanes import in_lane_order

# Slowest first (wall s of each module in one lane, run 11 of benchmarks/results/suite_tiers.md); here that is
# within 3 s of the best order benchmarks/lane_schedule.py finds on run 15's times. The rest keep their
# collection order.
LANE_ORDER = (
    "decorators/test_ray.py",  # 457
    "cluster/test_owner.py",  # 438
    "test_example_dags.py",  # 376
    "operators/test_checkpoint.py",  # 320
    "xcom/test_backend.py",  # 282
    "triggers/test_ray.py",  # 198
    "test_trust.py",  # 72
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    in_lane_order(items, Path(__file__).resolve().parent, LANE_ORDER)


@pytest.fixture(scope="session", autouse=True)
def _metadata_db(airflow_db: Path) -> Path:
    return airflow_db


@pytest.fixture
def default_xcom_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run this test's DAGs with Airflow's default XCom backend (results come back into Airflow as values).

    Airflow resolves ``[core] xcom_backend`` once, when ``airflow.sdk.execution_time.xcom`` is imported,
    and the task runner keeps its own reference; both are swapped for the test, which is what a process
    started without ``AIRFLOW__CORE__XCOM_BACKEND`` would have (the provider reads the same attribute:
    ``operators.ray.ray_xcom_backend_active``).
    """
    from airflow.sdk.bases.xcom import BaseXCom
    from airflow.sdk.execution_time import task_runner, xcom

    monkeypatch.setattr(xcom, "XCom", BaseXCom)
    monkeypatch.setattr(task_runner, "XCom", BaseXCom)
    yield
