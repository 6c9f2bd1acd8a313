"""Run ``airflow dags test <dag_id>`` in this process with timers around the provider's calls.

Usage (same environment as ``chain10.py``: AIRFLOW_HOME, DAGS_FOLDER, a running Ray head)::

    python benchmarks/profile_ray_task.py chain10_ray

Prints one table row per wrapped call (calls, first call, median of the later calls, total)
and, for ``chain10.py``, one ``PROFILE_JSON {...}`` line. Nothing under ``src/`` is changed:
the wrappers are installed on the imported modules before Airflow's CLI runs.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

_T0 = time.perf_counter()
import ray  # noqa: E402 - timed on purpose: the first import in a fresh process

IMPORT_RAY_S = time.perf_counter() - _T0
if __import__("os").environ.get("PROFILE_PRELOADED") == "1":
    # What a LocalExecutor task process inherits from a scheduler with [ray] preload_modules (plugins.py).
    from airflow_ray_provider.plugins import PRELOADED

    for _name in PRELOADED:
        __import__("importlib").import_module(_name)
PRELOAD_S = time.perf_counter() - _T0

TIMINGS: dict[str, list[float]] = defaultdict(list)


def _wrap(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMINGS[label].append(time.perf_counter() - started)

    setattr(owner, name, timed)


def _wrap_property(cls: type, name: str, label: str) -> None:
    prop = getattr(cls, name)

    def fget(self: Any) -> Any:
        started = time.perf_counter()
        try:
            return prop.fget(self)
        finally:
            TIMINGS[label].append(time.perf_counter() - started)

    setattr(cls, name, property(fget))


def install() -> None:
    from airflow_ray_provider import local_cluster, serialization, submission
    from airflow_ray_provider.cluster import owner
    from airflow_ray_provider.hooks import ray as hooks
    from airflow_ray_provider.operators.ray import RayPythonOperator

    op, hook, run = RayPythonOperator, hooks.RayHook, submission.RayTaskRun
    for target, name, label in (
        (op, "execute_callable", "execute_callable (all of it)"),
        (hook, "get_conn", "RayHook.get_conn"),
        (local_cluster.LocalRayCluster, "ensure_running", "  LocalRayCluster.ensure_running"),
        (hooks, "_connect_bounded", "  ray.init (_connect_bounded)"),
        (hook, "check_feasible", "RayHook.check_feasible (ray.nodes)"),
        (op, "_portable_kwargs", "_portable_kwargs"),
        (owner, "get_owner", "owner.get_owner (in RayTaskRun())"),
        (submission, "dumps_callable", "dumps_callable (in submit)"),
        (serialization, "dumps_callable", "serialization.dumps_callable (the operator's, in _prepare)"),
        (serialization, "_by_value_modules", "  _by_value_modules"),
        (run, "submit", "RayTaskRun.submit"),
        (run, "wait", "RayTaskRun.wait"),
        (run, "fetch", "RayTaskRun.fetch"),
        (run, "release", "RayTaskRun.release"),
    ):
        _wrap(target, name, label)
    _wrap_property(hook, "settings", "RayHook.settings (connection lookup)")
    _wrap(ray, "put", "  ray.put (in submit)")


def summary() -> dict[str, Any]:
    rows = []
    for label, values in TIMINGS.items():
        later = values[1:]
        rows.append({
            "call": label,
            "calls": len(values),
            "first_s": values[0],
            "later_median_s": statistics.median(later) if later else None,
            "total_s": sum(values),
        })
    return {"import_ray_s": IMPORT_RAY_S, "preload_s": PRELOAD_S, "rows": rows}


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    install()
    from airflow.__main__ import main as airflow_main

    sys.argv = ["airflow", "dags", "test", sys.argv[1]]
    code: int | str | None = 0
    try:
        airflow_main()
    except SystemExit as exc:
        code = exc.code
    data = summary()
    print(f"\nimport ray (cold, before Airflow): {data['import_ray_s']:.2f}s")
    print(f"{'call':42} {'calls':>5} {'first':>8} {'later med':>10} {'total':>8}")
    for row in data["rows"]:
        later = "-" if row["later_median_s"] is None else f"{row['later_median_s'] * 1000:.1f}ms"
        print(f"{row['call']:42} {row['calls']:5d} {row['first_s'] * 1000:6.1f}ms {later:>10} "
              f"{row['total_s']:7.2f}s")
    print("PROFILE_JSON " + json.dumps(data), flush=True)
    return code if isinstance(code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
