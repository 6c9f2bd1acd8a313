"""The owner actor: results outlive the submitting process, abandoned runs are reaped, no global lock."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from airflow_ray_provider.submission import RayTaskRun

LOG = logging.getLogger(__name__)
NAMESPACE = "tests"


def _run(key: str, lease_s: float = 60.0) -> RayTaskRun:
    return RayTaskRun(key=key, task_label=f"test.{key}", namespace=NAMESPACE, shards=2, lease_s=lease_s, log=LOG)


def _driver(script: str, address: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a separate Ray driver process (a stand-in for one Airflow task process)."""
    prelude = textwrap.dedent(f"""
        import logging, os, sys, time
        import ray
        ray.init(address={address!r}, namespace={NAMESPACE!r}, log_to_driver=False)
        from airflow_ray_provider.submission import RayTaskRun
        log = logging.getLogger("driver")
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _connect(address: str) -> None:
    from airflow_ray_provider.hooks import RayHook

    RayHook().get_conn()


def test_result_outlives_the_process_that_submitted_it(ray_cluster: str) -> None:
    _connect(ray_cluster)
    key = f"outlives/{uuid.uuid4().hex}"
    proc = _driver("""
        run = RayTaskRun(key=sys.argv[1], task_label="t", namespace="tests", shards=2, lease_s=60, log=log)
        run.submit(lambda n: list(range(n)), (5,), {}, {"num_cpus": 0})
        print(run.wait()["state"])
        # exits without release(): the owner actor, not this process, owns the result
    """, ray_cluster, key)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("finished")
    run = _run(key)
    try:
        assert run.fetch() == [0, 1, 2, 3, 4]
    finally:
        run.submitted = True
        run.release()


def test_run_abandoned_by_a_killed_process_is_cancelled(ray_cluster: str, tmp_path: Path) -> None:
    _connect(ray_cluster)
    beat = tmp_path / "beat"
    proc = _driver("""
        import signal
        from pathlib import Path
        def forever(path):
            while True:
                Path(path).write_text(str(time.time()))
                time.sleep(0.1)
        run = RayTaskRun(key=sys.argv[1], task_label="t", namespace="tests", shards=2, lease_s=5, log=log)
        run.submit(forever, (sys.argv[2],), {}, {"num_cpus": 0})
        while not Path(sys.argv[2]).exists():
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)  # no on_kill, no finally: only the lease can notice
    """, ray_cluster, f"abandoned/{uuid.uuid4().hex}", str(beat))
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert beat.exists()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        before = beat.stat().st_mtime_ns
        time.sleep(1.5)
        if beat.stat().st_mtime_ns == before:
            break
    else:
        pytest.fail("the Ray task of a SIGKILLed Airflow process is still running after 30s")


def test_many_runs_are_in_flight_at_once(ray_cluster: str) -> None:
    """Eight two-second tasks submitted from eight threads overlap: no lock serializes them."""
    _connect(ray_cluster)
    spans: dict[int, tuple[float, float]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        run = _run(f"concurrent/{uuid.uuid4().hex}/{i}")
        try:
            run.submit(_timed_sleep, (2.0,), {}, {"num_cpus": 0})
            assert run.wait()["state"] == "finished"
            spans[i] = run.fetch()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            run.release()

    # Round 1 starts the Ray workers (slow when the machine is busy); the keeper keeps them
    # warm, so round 2 measures the owner actor, not worker start-up.
    for _ in range(2):
        spans.clear()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert len(spans) == 8
    # Most overlap at some instant (a lock would give 1).
    peak = max(sum(start <= t < end for start, end in spans.values()) for t, _ in spans.values())
    assert peak >= 4, f"at most {peak} runs were in flight at once: {sorted(spans.values())}"


def _timed_sleep(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def test_released_key_is_a_clear_error(ray_cluster: str) -> None:
    from airflow_ray_provider.submission import RayObjectLost

    _connect(ray_cluster)
    run = _run(f"released/{uuid.uuid4().hex}")
    run.submit(lambda: 1, (), {}, {"num_cpus": 0})
    assert run.wait()["state"] == "finished"
    run.release()
    time.sleep(0.2)
    with pytest.raises(RayObjectLost, match="released/"):
        run.fetch()


def test_warm_workers_are_reused_across_short_lived_airflow_processes(ray_cluster: str) -> None:
    """The owner actors belong to the keeper's long-lived job, so Ray keeps their workers warm.

    Before the keeper, each task from a new process waited for a fresh Ray worker (8 workers for
    10 tasks in benchmarks/results/chain10.md), because Ray kills a finished job's idle workers.
    """
    _connect(ray_cluster)
    pids: list[int] = []
    for _ in range(3):
        proc = _driver("""
            for i in range(2):
                run = RayTaskRun(key=f"warm/{time.time()}/{i}", task_label="t", namespace="tests", shards=1,
                                 lease_s=60, log=log)
                run.submit(lambda: os.getpid(), (), {}, {"num_cpus": 1, "resources": {"session_head": 0.001}})
                assert run.wait()["state"] == "finished"
                print("PID", run.fetch(), flush=True)
                run.release()
                time.sleep(0.5)
        """, ray_cluster)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pids += [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PID")]
    assert len(pids) == 6
    assert len(set(pids)) <= 2, f"6 tasks from 3 exited processes needed {len(set(pids))} Ray workers: {pids}"

    import ray

    from airflow_ray_provider.owner import FACTORY_NAME, SYSTEM_NAMESPACE

    factory = ray.get_actor(FACTORY_NAME, namespace=SYSTEM_NAMESPACE)
    keeper_pid = ray.get(factory.ping.remote())
    assert keeper_pid > 0
