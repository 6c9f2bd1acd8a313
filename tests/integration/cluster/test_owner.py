"""The owner actor: results outlive the submitting process, abandoned runs are reaped, no global lock."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from airflow_ray_provider.cluster.owner import get_owner, shard_for
from airflow_ray_provider.submission import RayTaskRun

LOG = logging.getLogger(__name__)
NAMESPACE = "tests"


def _run(key: str, lease_s: float = 60.0) -> RayTaskRun:
    return RayTaskRun(key=key, task_label=f"test.{key}", namespace=NAMESPACE, shards=2, lease_s=lease_s, log=LOG)


def _driver(script: str, address: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a separate Ray driver process (a stand-in for one Airflow task process).

    ``timeout`` bounds a hang, not a speed: a new driver imports Ray and Airflow and connects, which took over
    120 s under stress-ng --cpu 2 beside the whole suite (run 17); the test's own 300 s limit is above it."""
    prelude = textwrap.dedent(f"""
        import logging, os, sys, time
        import ray
        ray.init(address={address!r}, namespace={NAMESPACE!r}, log_to_driver=False)
        from airflow_ray_provider.submission import RayTaskRun
        log = logging.getLogger("driver")
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _connect(address: str | None = None) -> None:
    """Join the cluster of ``ray_default`` (the session head unless the test changed it)."""
    from airflow_ray_provider.hooks.ray import RayHook

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
    beat, key = tmp_path / "beat", f"abandoned/{uuid.uuid4().hex}"
    # The keeper, the key's owner and an idle Ray worker exist before the driver starts: their start on a loaded
    # machine is not what this test is about (run 24: the driver, connected, had not seen its task start 240 s
    # later, beside the whole suite).
    get_owner(NAMESPACE, shard_for(key, 2))
    warm = _run(f"abandoned-warm/{uuid.uuid4().hex}")
    warm.submit(len, ([],), {}, {"num_cpus": 0})
    assert warm.wait()["state"] == "finished"
    warm.release()
    proc = _driver("""
        import signal
        from pathlib import Path
        def forever(path):
            while True:
                Path(path).write_text(str(time.time()))
                time.sleep(0.1)
        run = RayTaskRun(key=sys.argv[1], task_label="t", namespace="tests", shards=2, lease_s=5, log=log)
        run.submit(forever, (sys.argv[2],), {}, {"num_cpus": 0})
        print("submitted", file=sys.stderr, flush=True)  # a driver that times out says how far it got
        deadline = time.monotonic() + 180
        while not Path(sys.argv[2]).exists():
            if time.monotonic() > deadline:
                sys.exit(f"the Ray task did not start within 180 s: {run.state()}")
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)  # no on_kill, no finally: only the lease can notice
    """, ray_cluster, key, str(beat))
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert beat.exists()
    # The lease (5 s) runs out, then the owner cancels: bounded for a loaded machine, and "stopped" means no
    # beat for 3 s (a running task writes every 0.1 s).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        before = beat.stat().st_mtime_ns
        time.sleep(3)
        if beat.stat().st_mtime_ns == before:
            break
    else:
        pytest.fail("the Ray task of a SIGKILLed Airflow process is still running after 120s")


def test_many_runs_are_in_flight_at_once(ray_cluster: str, tmp_path: Path) -> None:
    """Eight tasks submitted from eight threads overlap: no lock serializes them. Each waits (bounded) until four
    have started, so the overlap does not depend on how fast Ray starts workers on a loaded machine (run 28: two-
    second sleeps overlapped only three at a time while workers started); a lock would keep the first one waiting
    alone until its bound."""
    _connect(ray_cluster)
    spans: dict[int, tuple[float, float]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        run = _run(f"concurrent/{uuid.uuid4().hex}/{i}")
        try:
            run.submit(_started_together, (str(tmp_path / "started"), 4), {}, {"num_cpus": 0})
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
        (tmp_path / "started").write_text("")
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


def _started_together(marker: str, count: int) -> tuple[float, float]:
    """Note this task's start in ``marker``, wait until ``count`` tasks have (at most 120 s), hold 0.5 s."""
    start = time.time()
    with open(marker, "a") as out:
        out.write("started\n")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with open(marker) as seen:
            if len(seen.readlines()) >= count:
                break
        time.sleep(0.02)
    time.sleep(0.5)
    return start, time.time()


def test_released_key_is_a_clear_error(ray_cluster: str) -> None:
    from airflow_ray_provider.exceptions import RayObjectLost

    _connect(ray_cluster)
    run = _run(f"released/{uuid.uuid4().hex}")
    run.submit(lambda: 1, (), {}, {"num_cpus": 0})
    assert run.wait()["state"] == "finished"
    run.release()
    time.sleep(0.2)
    with pytest.raises(RayObjectLost, match="released/"):
        run.fetch()


def test_released_result_is_freed_from_the_object_store(ray_cluster: str) -> None:
    """Release drops the owner's last reference, so Ray frees the bytes (nothing in the owner keeps it).

    The run is the only one its owner watches: the owner's loops once kept the last round's runs in their
    frames, which pinned a released 16 MB frame in the store until another run came (found by the Ray tab's
    browser test).
    """
    import ray

    from airflow_ray_provider.cluster import ray_compat

    _connect(ray_cluster)
    gcs = ray.get_runtime_context().gcs_address

    def used() -> int:
        use = ray_compat.object_store_use(gcs)
        assert use is not None, "ray memory --stats-only gave no Plasma line"
        return use[0]

    before = used()
    run = _run(f"freed/{uuid.uuid4().hex}")
    run.submit(lambda n: b"x" * n, (64 * 2**20,), {}, {"num_cpus": 0})
    assert run.wait()["state"] == "finished"
    time.sleep(1.0)  # several rounds of the owner's loops
    held = used()
    assert held >= before + 60 * 2**20, (before, held)
    run.release()
    deadline = time.monotonic() + 30
    while (now := used()) > held - 60 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert now <= held - 60 * 2**20, f"still {now} bytes in the store after release (held {held}, before {before})"


# Three fresh driver processes one after another (each up to _driver's 240 s): the default 300 s ran out under
# stress-ng --cpu 2 beside the suite (run 20), each driver taking about 100 s to import Ray and connect.
@pytest.mark.timeout(900)
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

    from airflow_ray_provider.cluster.owner import FACTORY_NAME, SYSTEM_NAMESPACE

    factory = ray.get_actor(FACTORY_NAME, namespace=SYSTEM_NAMESPACE)
    keeper_pid = ray.get(factory.ping.remote())
    assert keeper_pid > 0


def _stop_actor(handle: object) -> None:
    import ray

    try:
        ray.kill(handle)
    except Exception as exc:  # noqa: BLE001 - a cleanup problem must not hide the test's own result
        LOG.warning("Could not kill test actor %r: %s", handle, exc)


def test_a_wedged_owner_fails_the_task_within_a_bound_naming_owner_and_key(
        ray_connection: Callable[..., object], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    """An owner actor that never answers (its event loop stuck) fails the task, in submit or in poll.

    The stand-in is a real actor registered under the owner's name in a fresh namespace, so
    ``get_owner`` finds it as it would find a real wedged owner. Without the bounds the task hangs, and
    the test's timeout fails it.
    """
    import asyncio

    import ray

    from airflow_ray_provider import submission
    from airflow_ray_provider.cluster.owner import owner_name
    from tests.dags import owner_dags
    from tests.support.rows import task_states

    class WedgedOwner:
        """Accepts the submit of one task, then never answers anything again."""

        async def submit(self, key: str, payload: list, options: dict, lease_s: float,
                         hold_s: float = 0.0) -> str:
            if "/stuck_in_submit/" in key:
                await asyncio.Event().wait()
            return "accepted"

        async def poll(self, key: str, log_offset: int, timeout: float) -> dict:
            await asyncio.Event().wait()
            return {}

        async def cancel(self, key: str) -> bool:
            await asyncio.Event().wait()
            return False

        async def release(self, keys: list) -> int:
            await asyncio.Event().wait()
            return 0

    namespace = f"wedged-{uuid.uuid4().hex[:8]}"
    ray_connection(namespace=namespace, lease_timeout=5)
    _connect()
    wedged = ray.remote(WedgedOwner).options(name=owner_name(0), namespace=namespace, num_cpus=0,
                                             max_concurrency=100).remote()
    ray.get(wedged.__ray_ready__.remote(), timeout=60)
    monkeypatch.setattr(submission, "OWNER_CALL_TIMEOUT_S", 3.0)  # the submit bound; polls: the 5 s lease
    try:
        dr = owner_dags.wedged_owner_dag.test()
        captured = capfd.readouterr()
        output = captured.out + captured.err
    finally:
        _stop_actor(wedged)
    assert task_states(dr) == {"stuck_in_submit": "failed", "stuck_in_poll": "failed"}, output[-6000:]
    owner = f"owner actor 'airflow-ray-owner-0' (namespace '{namespace}')"
    for task_id, what, bound in (("stuck_in_submit", "submit", "3s"), ("stuck_in_poll", "poll", "5s")):
        assert re.search(rf"RayWaitTimeout: No answer from {re.escape(owner)}: {what}\b.* of Ray task "
                         rf"wedged_owner\.{task_id} \(key wedged_owner/[^/]+/{task_id}/-1/\d+/[0-9a-f]{{8}}\) "
                         rf"within {bound} \(Ray cluster at [^)]+\)", output), output[-6000:]
    assert "Not waiting for " + owner in output, output[-6000:]  # cancel did not wait on it again


def _big_bytes(n: int) -> bytes:
    return b"x" * n


@pytest.mark.parametrize("broken", ["remote lookup", "remote and local lookups"])
def test_a_failed_location_lookup_is_logged_and_never_pulls_the_result_into_the_owner(
        ray_cluster: str, broken: str) -> None:
    """``get_object_locations`` failing in the owner must not make it fetch a 64 MiB result to decide.

    The fault is injected into a real owner actor (its own copy of ``ray.experimental`` raises);
    the Ray task, the object store and the actor's peak memory are real.
    """
    import ray

    from airflow_ray_provider.cluster.owner import TaskOwner, owner_name

    class FaultyLocationsOwner(TaskOwner):
        def __init__(self, broken: str) -> None:
            import ray.experimental

            super().__init__()
            self._lines: list[str] = []
            lines = self._lines

            class Keep(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    lines.append(record.getMessage())

            logging.getLogger("airflow_ray_provider.cluster.owner").addHandler(Keep())

            def down(*args: object, **kwargs: object) -> None:
                raise RuntimeError("injected fault: object locations unavailable")

            ray.experimental.get_object_locations = down
            if broken == "remote and local lookups":
                ray.experimental.get_local_object_locations = down

        async def peak_rss_kib(self) -> int:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        async def log_lines(self) -> list[str]:
            return list(self._lines)

    _connect(ray_cluster)
    namespace = f"unlocated-{uuid.uuid4().hex[:8]}"
    # A runtime_env of its own gives the actor a fresh worker process, so its peak RSS is its own.
    owner = ray.remote(FaultyLocationsOwner).options(
        name=owner_name(0), namespace=namespace, num_cpus=0, max_concurrency=1000,
        runtime_env={"env_vars": {"AIRFLOW_RAY_TEST_FRESH_WORKER": namespace}}).remote(broken)
    size = 64 << 20
    run = RayTaskRun(key=f"unlocated/{uuid.uuid4().hex}", task_label="test.unlocated", namespace=namespace,
                     shards=1, lease_s=60, log=LOG)
    try:
        before = ray.get(owner.peak_rss_kib.remote(), timeout=60)
        run.submit(_big_bytes, (size,), {}, {"num_cpus": 0})
        assert run.wait()["state"] == "finished"
        grown_mib = (ray.get(owner.peak_rss_kib.remote(), timeout=60) - before) / 1024
        assert grown_mib < 32, f"the owner's peak RSS grew by {grown_mib:.0f} MiB: it fetched the result"
        lines = ray.get(owner.log_lines.remote(), timeout=60)
        assert any("get_object_locations failed" in line and run.key in line and "injected fault" in line
                   for line in lines), lines
        if broken == "remote and local lookups":
            assert any(run.key in line and "without fetching it into the owner actor" in line for line in lines), lines
        else:  # the owner's own core worker still knew where the object is
            info = ray.get(run.owner.describe.remote(run.key), timeout=60)
            assert info["size"] >= size and info["node_ids"], info
        assert len(run.fetch()) == size  # the result itself is intact
    finally:
        run.release()
        _stop_actor(owner)
