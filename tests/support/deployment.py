"""Helpers for tests that run a real Airflow deployment (scripts/local_topology.py) on DAGs that report back.

The DAGs of tests/dags/durable_dags.py and deferrable_dags.py append ``start <call> <time>`` and
``end <call> <time>`` to ``$AIRFLOW_RAY_TEST_MARKERS/<dag_id>`` each time a body starts and ends, and wait
for ``<dag_id>.go`` before they end (``release``), so a test paces them by what it has seen, not by sleeps.
Process lookups are scoped to one deployment's process tree: lanes of the suite run side by side.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import psutil

from scripts.local_topology import Component

GO_SUFFIX = ".go"


def calls(marker: Path) -> dict[str, set[str]]:
    """``{"start": {call ids}, "end": {call ids}}`` from a marker file."""
    lines = marker.read_text().split("\n") if marker.exists() else []
    found: dict[str, set[str]] = {"start": set(), "end": set()}
    for line in filter(None, lines):
        what, call, _ = line.split()
        found[what].add(call)
    return found


def intervals(marker: Path) -> list[tuple[float, float]]:
    """``(start, end)`` of each body call; ``end`` is infinite for a call that never ended."""
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for line in filter(None, marker.read_text().split("\n") if marker.exists() else []):
        what, call, at = line.split()
        (starts if what == "start" else ends)[call] = float(at)
    return [(starts[c], ends.get(c, float("inf"))) for c in starts]


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """How many of ``spans`` were open at once, at most."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def release(markers: Path, dag_id: str) -> None:
    """Let the bodies of ``dag_id`` that wait for the test end (tests/dags/durable_dags.py ``hold``)."""
    (markers / f"{dag_id}{GO_SUFFIX}").touch()


def try_logs(home: Path, dag_id: str, task_id: str, attempt: int, map_index: int | None = None) -> str:
    """The task log of one try (every matching map index unless one is given)."""
    logs = sorted((home / "logs").rglob(f"attempt={attempt}.log"))
    wanted = [p for p in logs if f"dag_id={dag_id}" in str(p) and f"task_id={task_id}" in str(p)
              and (map_index is None or f"map_index={map_index}" in str(p))]
    return "\n".join(p.read_text(errors="replace") for p in wanted)


def descendants(component: Component) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(component.proc.pid).children(recursive=True)
    return []


# A task runner's title: "airflow worker -- <task instance id>". LocalExecutor's own workers are titled
# "airflow worker -- LocalExecutor: ..." and must be left alone: one killed while idle can hold the executor's
# queue lock, and then no task is ever run again.
RUNNER_TITLE = re.compile(r"airflow worker -- [0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def task_processes(scheduler: Component) -> list[psutil.Process]:
    """The task runners under one scheduler, and the LocalExecutor workers supervising them.

    LocalExecutor forks them from the scheduler, so they are its descendants, and no other deployment's.
    """
    found: list[psutil.Process] = []
    for proc in descendants(scheduler):
        with contextlib.suppress(psutil.Error):
            if RUNNER_TITLE.match(" ".join(proc.cmdline()).strip()):
                found.append(proc)
                parent = proc.parent()
                if parent is not None and parent.pid != scheduler.proc.pid:
                    found.append(parent)
    return found


def started_under(component: Component, text: str, after: float = 0.0) -> bool:
    """Whether a process whose command line holds ``text`` runs under ``component``, started after ``after``."""
    for proc in descendants(component):
        with contextlib.suppress(psutil.Error):
            if text in " ".join(proc.cmdline()) and proc.create_time() >= after - 1.0:
                return True
    return False


def since(started: float) -> float:
    return round(time.monotonic() - started, 1)
