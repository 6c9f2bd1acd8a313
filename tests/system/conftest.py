"""The system tier: tests that need processes of their own (``make test-system``, in lanes).

Each lane (a pytest-xdist worker) has its own Airflow home, session Ray head and S3 server; a module's tests
stay in one lane (``--dist loadfile``), so a module-scoped head, server or DAG run is started once. The
longest modules are handed out first, so no lane is left with one at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.lanes import longest_first

# Slowest first (wall s of each module in one lane, this stop's runs: benchmarks/results/suite_tiers.md, "Lanes");
# the rest keep their collection order.
LONGEST_FIRST = (
    "cluster/test_try_cleanup.py",  # 330-390
    "test_example_dags.py",  # 250
    "hooks/test_cluster_addresses.py",  # 244
    "deployment/test_netns_topology.py",  # 216-296
    "test_local_cluster.py",  # 222
    "triggers/test_deferrable.py",  # 200-220
    "ui/test_task_ui.py",  # 177
    "operators/test_durable.py",  # 145
    "hooks/test_cluster_restart.py",  # 139
    "test_bundle_stock_ray.py",  # 121-134
    "ui/test_connection_ui.py",  # 98-132
    "test_scheduler_postgres.py",  # 83
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    longest_first(items, Path(__file__).resolve().parent, LONGEST_FIRST)
