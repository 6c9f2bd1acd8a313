"""The unit tier: no Ray cluster, no metadata DB, no S3 server (``make test-unit``, under 2 minutes).

Enforced, not just promised: a unit test that asks for a shared service is refused at collection, and
one that connects to Ray or writes the metadata DB fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import SERVICE_FIXTURES

UNIT = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if UNIT not in Path(str(item.fspath)).resolve().parents:
            continue
        wanted = SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if wanted:
            raise pytest.UsageError(f"{item.nodeid} is a unit test but asks for {sorted(wanted)}: move it to "
                                    "tests/integration or tests/system")


def _db_state() -> tuple[float, int] | None:
    path = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_mtime, info.st_size


@pytest.fixture(autouse=True)
def _no_ray_and_no_metadata_db() -> Iterator[None]:
    ray = sys.modules.get("ray")
    connected_before = bool(ray and ray.is_initialized())
    db_before = _db_state()
    yield
    ray = sys.modules.get("ray")
    assert connected_before or not (ray and ray.is_initialized()), "a unit test connected to Ray"
    assert _db_state() == db_before, "a unit test used the Airflow metadata DB"
