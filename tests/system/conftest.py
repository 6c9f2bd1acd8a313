"""The system tier: tests that need processes of their own (``make test-system``, in lanes).

Each lane (a pytest-xdist worker) has its own Airflow home, session Ray head and S3 server; a module whose
tests share a module-scoped head or server keeps them in one lane (``xdist_group``). The longest tests are
handed out first, so no lane is left with one at the end.
"""

from __future__ import annotations

import pytest

# Slowest first (measured: benchmarks/results/suite_tiers.md); the rest keep their collection order.
LONGEST_FIRST = (
    "deployment/test_netns_topology.py",
    "operators/test_durable.py",
    "triggers/test_deferrable.py",
    "cluster/test_try_cleanup.py",
    "ui/test_task_ui.py",
    "test_example_dags.py",
    "hooks/test_cluster_addresses.py",
    "test_scheduler_postgres.py",
)


def _rank(item: pytest.Item) -> int:
    path = str(item.path).replace("\\", "/")
    return next((n for n, name in enumerate(LONGEST_FIRST) if path.endswith(f"tests/system/{name}")),
                len(LONGEST_FIRST))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    system = [item for item in items if "/tests/system/" in str(item.path).replace("\\", "/")]
    if not system:
        return
    order = {id(item): n for n, item in enumerate(sorted(system, key=_rank))}
    items.sort(key=lambda item: order.get(id(item), -1))
