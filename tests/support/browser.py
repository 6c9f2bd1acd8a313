"""A real ``airflow api-server`` and headless chromium (Debian's, driven by Playwright) for UI tests.

Playwright's own browser download cannot run here, so the tests use ``/usr/bin/chromium``
(``apt-get install -y chromium``) and skip, saying so, where it or Playwright is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser_or_skip() -> Any:
    """Playwright's ``sync_playwright``, or a skip naming what is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install -y chromium` (Debian's browser; Playwright's "
                    "own download cannot run here)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `pip install -c constraints.txt '.[test]'`")
    return sync_playwright


@contextlib.contextmanager
def running_api_server(workdir: Path, output: Path, env_overrides: dict[str, str] | None = None) -> Iterator[str]:
    """A real API server on a free loopback port for this session's AIRFLOW_HOME and DB, every user an
    admin (unless ``env_overrides`` say otherwise), connection testing enabled; its log is copied to
    ``output`` when it stops."""
    from airflow_ray_provider.local_cluster import free_ports, port_open

    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_CONN_RAY_DEFAULT"}
    env.update(AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True", AIRFLOW__CORE__TEST_CONNECTION="Enabled")
    env.update(env_overrides or {})
    log_path = workdir / f"api-server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "airflow", "api-server", "-H", "127.0.0.1", "-p", str(port),
                                 "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own process group, so it is stopped whole
    try:
        deadline = time.monotonic() + 120
        while not port_open("127.0.0.1", port, timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"airflow api-server did not start on port {port}: "
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        output.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, output / log_path.name)
