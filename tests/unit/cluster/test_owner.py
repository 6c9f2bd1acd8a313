"""What the owner actor reports while Ray installs a task's runtime_env, and when it asks where a result is (the
actor itself: tests/integration)."""

from __future__ import annotations

import itertools

import pytest

from airflow_ray_provider.cluster.owner import (
    SETUP_NOTICE_AT_S,
    SETUP_NOTICE_EVERY_S,
    _Run,
    awaits_location,
    installs,
    setup_notice_ages,
)


@pytest.mark.parametrize(("runtime_env", "expected"), [
    (None, ""),
    ({"env_vars": {"A": "1"}, "py_modules": ["x"]}, ""),  # nothing Ray installs with a package manager
    ({"pip": ["pandas==2.2", "pyarrow"]}, "pip: pandas==2.2, pyarrow"),
    ({"pip": {"packages": ["a"], "pip_install_options": ["-q"]}}, "pip: a"),
    ({"uv": [f"p{i}" for i in range(7)]}, "uv: p0, p1, p2, p3, p4, ..."),
    ({"conda": "my-env", "pip": []}, "conda"),
    ({"pip": "requirements.txt"}, "pip"),
    ({"image_uri": "repo/image:tag"}, "image_uri"),
])
def test_installs_names_what_ray_sets_up_before_the_task_starts(runtime_env: dict | None, expected: str) -> None:
    assert installs(runtime_env) == expected


def test_notices_come_early_then_every_ten_minutes() -> None:
    ages = list(itertools.islice(setup_notice_ages(), len(SETUP_NOTICE_AT_S) + 2))
    assert ages[:len(SETUP_NOTICE_AT_S)] == list(SETUP_NOTICE_AT_S) and ages[0] <= 10
    assert ages[-1] - ages[-2] == ages[-2] - SETUP_NOTICE_AT_S[-1] == SETUP_NOTICE_EVERY_S


def _finished(size: int | None, node_ids: list[str], estimate: int | None) -> _Run:
    run = _Run(key="k", ref=None, lease_s=60.0, events={"described": {"size_estimate": estimate}},  # type: ignore[arg-type]
               size=size, node_ids=node_ids)
    run.in_store = bool(size) and bool(node_ids)
    return run


@pytest.mark.parametrize(("size", "node_ids", "estimate", "waits"), [
    (417, [], None, False),  # 100 small dicts, inline in the reply (Ray's answer for it): settled at once
    (417, [], 417, False),
    (16_000_253, ["n1"], 16_000_000, False),  # in the store, located
    (16_000_253, [], 16_000_000, True),  # large, its node not reported yet: asked again
    (None, [], None, True),  # Ray could not size it: it may be large
    (None, [], 50, False),  # the worker sized it small
])
def test_only_a_large_unplaced_result_waits_for_its_location(size: int | None, node_ids: list[str],
                                                            estimate: int | None, waits: bool) -> None:
    assert awaits_location(_finished(size, node_ids, estimate), returned=True, located=True) is waits
    assert awaits_location(_finished(size, node_ids, estimate), returned=False, located=True) is False
