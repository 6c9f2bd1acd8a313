"""The system tier: tests that need processes of their own (``make test-system``, in lanes).

Each lane (a pytest-xdist worker) has its own Airflow home, session Ray head and S3 server; a module's tests
stay in one lane (``--dist loadfile``), so a module-scoped head, server or DAG run is started once. The modules
are handed out in the order that keeps the lanes' ends closest (``LANE_ORDER``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.lanes import in_lane_order

# The order benchmarks/lane_schedule.py found best on run 15's test times (benchmarks/results/lane_schedule.md):
# 1088 s on average over times perturbed by up to 25% per module, against 1148 for slowest-first. A lane takes its
# next module when two or fewer of its tests are left, so a module of one or two tests is followed at once by
# another in the same lane; slowest-first put the two longest such modules in one lane. Measured (run 16): the
# lanes ended within 41 s of each other (151 s apart in run 15), but the tier took 1152 s against 1138: the tier is
# CPU-bound, and with all three lanes busy to the end each module ran slower. Each module's wall s, run 15.
LANE_ORDER = (
    "hooks/test_cluster_restart.py",  # 127
    "triggers/test_deferrable.py",  # 307
    "cluster/test_try_cleanup.py",  # 387
    "operators/test_durable.py",  # 163
    "hooks/test_cluster_addresses.py",  # 392
    "test_example_dags.py",  # 417
    "deployment/test_netns_topology.py",  # 344
    "test_local_cluster.py",  # 297
    "ui/test_connection_ui.py",  # 137
    "ui/test_task_ui.py",  # 240
    "test_bundle_stock_ray.py",  # 195
    "hooks/test_version_mismatch.py",  # 22
    "test_scheduler_postgres.py",  # 105
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    in_lane_order(items, Path(__file__).resolve().parent, LANE_ORDER)
