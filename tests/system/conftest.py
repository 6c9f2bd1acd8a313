"""The system tier: tests that need processes of their own (``make test-system``, in lanes).

Each lane (a pytest-xdist worker) has its own Airflow home, session Ray head and S3 server; a module's tests
stay in one lane (``--dist loadfile``), so a module-scoped head, server or DAG run is started once. The
longest modules are handed out first, so no lane is left with one at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.lanes import longest_first

# Slowest first (wall s of each module in one lane, run 11 of benchmarks/results/suite_tiers.md, 3 lanes; the
# concurrent-start and saved-token tests of test_local_cluster.py now share a head, about 60 s); the rest keep
# their collection order. A lane also takes its next module when two or fewer of its tests are left
# (pytest-xdist's LoadScopeScheduling), so this is longest-first, not exact.
LONGEST_FIRST = (
    "cluster/test_try_cleanup.py",  # 378
    "test_example_dags.py",  # 364
    "test_local_cluster.py",  # 343
    "hooks/test_cluster_addresses.py",  # 299
    "deployment/test_netns_topology.py",  # 285
    "ui/test_task_ui.py",  # 233
    "triggers/test_deferrable.py",  # 201
    "test_bundle_stock_ray.py",  # 198
    "operators/test_durable.py",  # 149
    "hooks/test_cluster_restart.py",  # 138
    "test_scheduler_postgres.py",  # 130
    "ui/test_connection_ui.py",  # 103
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    longest_first(items, Path(__file__).resolve().parent, LONGEST_FIRST)
