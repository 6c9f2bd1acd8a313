"""A cluster of another Ray or Python version fails the task at once, naming both versions and what to do."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_ray_provider.exceptions import RayVersionMismatch
from airflow_ray_provider.hooks.ray import RayHook
from tests.support import ROOT
from tests.support.heads import head_from

# Built by `make versions` (the oldest supported combination: another Ray and another Python).
OTHER = Path(os.environ.get("AIRFLOW_RAY_OTHER_VENV") or ROOT / ".venv-py3.10-ray2.58-airflow3.2")


@pytest.fixture(scope="module")
def other_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with head_from(OTHER, tmp_path_factory.mktemp("other-head"), "`make versions` builds it", num_cpus=1) as head:
        yield head


def test_a_cluster_of_another_ray_and_python_fails_fast_naming_both(
        other_head: Any, ray_connection: Callable[..., Any]) -> None:
    import ray

    cluster, state = other_head
    ray_connection({"conn_type": "ray", "password": cluster.auth_token(),
                    "extra": {"address": state.address, "namespace": "mismatch"}})
    started = time.monotonic()
    with pytest.raises(RayVersionMismatch) as info:
        RayHook().get_conn()
    elapsed = time.monotonic() - started
    message = str(info.value)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"runs Ray {ray.__version__} on Python {here}" in message, message
    assert "the cluster runs Ray 2.58" in message and "on Python 3.10" in message, message
    assert "install ray==2.58" in message, message
    assert elapsed < 60, f"took {elapsed:.0f}s: a refusal must come at the first exchange, not after retries"
