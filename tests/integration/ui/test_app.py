"""The Ray tab's server side against the session head: what a burst of page loads costs the API server.

Its pages in a real API server and Chromium are in tests/system/ui/test_task_ui.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from airflow_ray_provider.ui import app

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_a_burst_of_listings_runs_a_bounded_number_of_inspections() -> None:
    """Eight listings at once (eight tabs, a reload loop): at most INSPECT_AT_ONCE processes, all answered."""
    seen: set[int] = set()
    most = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            running = []
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "airflow_ray_provider.ui.inspect" in " ".join(proc.cmdline()):
                        running.append(proc)
            seen.update(p.pid for p in running)
            most = max(most, len(running))
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            reports = list(pool.map(lambda _: app._inspect("ray_default", [], release=False), range(8)))
    finally:
        done.set()
        watcher.join(10)
    assert [r.error for r in reports] == [None] * 8, reports
    assert all(r.store_capacity_bytes for r in reports), reports
    assert most <= app.INSPECT_AT_ONCE and len(seen) <= app.INSPECT_AT_ONCE, (most, seen)
    print(f"8 listings at once: {len(seen)} inspection process(es), {time.monotonic() - started:.1f}s")
