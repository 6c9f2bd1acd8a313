"""The system tier: tests that need processes of their own (``make test-system``, in lanes).

Each lane (a pytest-xdist worker) has its own Airflow home, session Ray head and S3 server; a module's tests
stay in one lane (``--dist loadfile``), so a module-scoped head, server or DAG run is started once. The modules
are handed out in the order that keeps the lanes' ends closest (``LANE_ORDER``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.lanes import in_lane_order, module_in

# `make test` runs these modules beside the integration tier (marked beside_integration), the rest afterwards in
# lanes. Run 16: the integration phase used 73% of both cores (the smoke and unit runs end 290 s before the
# integration lanes do), the system tier alone 92% (CPU-bound), so system work moved into the first phase shortens
# the second by more than it lengthens the first. Chosen to fit in the integration tier's ~770 s beside it and to
# hold no short time window (no browser, no triggerer); each module's wall s, run 16.
BESIDE_INTEGRATION = (
    "test_bundle_stock_ray.py",  # 179
    "hooks/test_cluster_restart.py",  # 134
    "test_scheduler_postgres.py",  # 101
    "hooks/test_version_mismatch.py",  # 85
)
# The order of the rest, slowest first (run 16's wall s). Before BESIDE_INTEGRATION, benchmarks/lane_schedule.py
# found the order that kept three lanes' ends within 41 s (run 16) but the tier took as long (1152 s against
# 1138): it is CPU-bound, so the order matters less than what runs in it.
LANE_ORDER = (
    "test_example_dags.py",  # 496
    "cluster/test_try_cleanup.py",  # 446
    "deployment/test_netns_topology.py",  # 369
    "hooks/test_cluster_addresses.py",  # 352
    "test_local_cluster.py",  # 322
    "ui/test_connection_ui.py",  # 260
    "ui/test_task_ui.py",  # 226
    "triggers/test_deferrable.py",  # 219
    "operators/test_durable.py",  # 166
    *BESIDE_INTEGRATION,  # when the whole tier runs (make test-system)
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if module_in(item, here) in BESIDE_INTEGRATION:
            item.add_marker(pytest.mark.beside_integration)
    in_lane_order(items, here, LANE_ORDER)
