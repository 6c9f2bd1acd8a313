"""RayRunTrigger against the session's Ray head: runs submitted with RayTaskRun, watched only by triggers.

The pytest process is the Ray driver that submits (a stand-in for the task process that defers);
the triggers under test reach Ray only through their watcher subprocesses, one per connection, from one
event loop shared by the module's tests (as a triggerer's). ``dag.test()`` running a deferred task's
trigger in line, with a loop of its own, is the last test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_ray_provider.submission import RayTaskRun
from airflow_ray_provider.triggers import RayRunTrigger, sign_run, watcher
from airflow_ray_provider.triggers import ray as trigger_mod

LOG = logging.getLogger(__name__)
NAMESPACE = "tests"  # the session head's ray_default namespace (tests/support/fixtures.py)
CONN = "ray_default"
EVENT_WITHIN_S = 120.0  # a few seconds of work plus a watcher start on a busy 2-core machine


def _sleep_then(seconds: float, fail: bool = False) -> str:
    time.sleep(seconds)
    if fail:
        raise ValueError("the callable failed on purpose")
    return "slept"


@pytest.fixture
def submit(ray_cluster: str) -> Iterator[Callable[..., RayTaskRun]]:
    """Submit ``_sleep_then`` runs from this process; released afterwards."""
    from airflow_ray_provider.hooks.ray import RayHook

    RayHook().get_conn()
    runs: list[RayTaskRun] = []

    def _submit(seconds: float, *, fail: bool = False, lease_s: float = 60.0) -> RayTaskRun:
        key = f"trigger/{uuid.uuid4().hex}"
        run = RayTaskRun(key=key, task_label=f"test.{key}", namespace=NAMESPACE, shards=2, lease_s=lease_s, log=LOG)
        run.submit(_sleep_then, (seconds,), {"fail": fail}, {"num_cpus": 0})
        runs.append(run)
        return run

    yield _submit
    for run in runs:
        run.release()


def _trigger(run: RayTaskRun, conn_id: str = CONN, poll_interval: float = 0.5, **overrides: Any) -> RayRunTrigger:
    fields: dict[str, Any] = {"ray_conn_id": conn_id, "namespace": NAMESPACE, "shard": run.shard, "key": run.key,
                              "task_label": run.task_label, "poll_interval": poll_interval}
    fields["signature"] = sign_run(conn_id, NAMESPACE, run.shard, run.key)
    fields.update(overrides)
    return RayRunTrigger(**fields)


async def _events(trigger: RayRunTrigger) -> list[dict[str, Any]]:
    return [event.payload async for event in trigger.run()]


_LOOP: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(scope="module", autouse=True)
def trigger_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module's triggers, in a thread of its own, as a triggerer runs them.

    Its watcher subprocesses (one per connection) start once and serve every test, as in a triggerer;
    a watcher start takes 5-60 s here (an interpreter that imports Ray and joins the cluster).
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="trigger-loop", daemon=True)
    thread.start()
    _LOOP.append(loop)
    try:
        yield loop
    finally:
        _LOOP.clear()
        asyncio.run_coroutine_threadsafe(watcher.close_all(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def _arun(coro_fn: Callable[[], Awaitable[Any]], within: float = EVENT_WITHIN_S) -> Any:
    """Run ``coro_fn()`` on the module's trigger loop, bounded by ``within``."""
    (loop,) = _LOOP
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro_fn(), within), loop)
    try:
        return future.result(within + 30)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise


def _state(run: RayTaskRun) -> str:
    """The run's state as the owner sees it (from this process, not through a trigger)."""
    return run.state()["state"]


def test_finished_and_failed_runs(submit: Callable[..., RayTaskRun]) -> None:
    ok, bad = submit(3.0), submit(2.0, fail=True)

    async def _both() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(_events(_trigger(ok)), _events(_trigger(bad)))

    (done_ok,), (done_bad,) = _arun(_both)
    assert done_ok == {"status": "done", "state": "finished", "key": ok.key, "shard": ok.shard,
                       "namespace": NAMESPACE, "ray_conn_id": CONN,
                       "signature": sign_run(CONN, NAMESPACE, ok.shard, ok.key), "error": None}
    assert done_bad["status"] == "done" and done_bad["state"] == "failed", done_bad
    assert "the callable failed on purpose" in (done_bad["error"] or "")
    assert trigger_mod.verify_run(CONN, NAMESPACE, done_bad["shard"], done_bad["key"], done_bad["signature"])


@pytest.mark.parametrize("tamper", ["forged", "other_key", "other_shard", "empty"])
def test_unsigned_trigger_touches_nothing(submit: Callable[..., RayTaskRun], monkeypatch: pytest.MonkeyPatch,
                                          tamper: str) -> None:
    run = submit(4.0, lease_s=30)
    other = f"trigger/{uuid.uuid4().hex}"
    trigger = {
        "forged": lambda: _trigger(run, signature="hmac-sha256:" + "0" * 64),
        # a valid signature, for another run: the row was edited to point at this one
        "other_key": lambda: _trigger(run, signature=sign_run(CONN, NAMESPACE, run.shard, other)),
        "other_shard": lambda: _trigger(run, shard=1 - run.shard),
        "empty": lambda: _trigger(run, signature=""),
    }[tamper]()
    requests: list[Any] = []
    monkeypatch.setattr(watcher.WatcherClient, "request", lambda self, *a, **kw: requests.append(a))
    (event,) = _arun(lambda: _events(trigger))
    assert event["status"] == "error"
    assert trigger.key in event["message"] and "not signed by this deployment" in event["message"]
    assert requests == []  # neither a poll nor a cancel reached a watcher
    # Nor a cancel through the cancellation path (a user marking the task failed).
    trigger.task_instance = SimpleNamespace(dag_id="d", task_id="t", run_id="r", map_index=-1)
    monkeypatch.setattr(trigger_mod.RayRunTrigger, "safe_to_cancel", _always(True))
    _arun(trigger.on_kill)
    assert requests == []
    assert _state(run) == "running"


def _always(value: bool) -> Callable[..., Awaitable[bool]]:
    async def _answer(self: Any) -> bool:
        return value

    return _answer


def test_event_loop_is_never_blocked(submit: Callable[..., RayTaskRun]) -> None:
    runs = [submit(4.0) for _ in range(20)]
    lags: list[float] = []

    async def _watch() -> list[list[dict[str, Any]]]:
        stop = asyncio.Event()

        async def _monitor() -> None:
            while not stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - before - 0.01)

        monitor = asyncio.create_task(_monitor())
        try:
            return await asyncio.gather(*(_events(_trigger(run)) for run in runs))
        finally:
            stop.set()
            await monitor

    results = _arun(_watch)
    assert [events[0]["state"] for events in results] == ["finished"] * 20
    assert len(lags) > 100
    # Loose on purpose (a shared 2-core machine); a blocking ray.get in the loop would show seconds.
    assert max(lags) < 1.0, f"event loop stalled {max(lags):.3f}s (p50 {sorted(lags)[len(lags) // 2]:.4f}s)"


def test_trigger_alone_keeps_the_lease(submit: Callable[..., RayTaskRun]) -> None:
    """Only the trigger polls a run with an 8 s lease for 20 s: without renewal the owner would reap it.

    The watcher is started before the run is submitted. Its start took 20-66 s on the loaded 2-core CI
    machine, longer than this lease, and CI once saw the run reaped before the first poll ("cancelled").
    A deferring task's lease covers that start (``TRIGGERER_FAILOVER_S`` is added to it); what this
    test checks is that polls alone renew the lease, once a watcher answers.
    """

    async def _watch() -> tuple[RayTaskRun, list[dict[str, Any]]]:
        warm = await watcher.get_client(CONN).poll(NAMESPACE, 0, "trigger/warm-up", timeout=EVENT_WITHIN_S)
        assert warm["state"] == "unknown", warm  # the watcher answers, and a poll created nothing
        run = submit(20.0, lease_s=8)
        return run, await _events(_trigger(run, poll_interval=2.0))

    run, (event,) = _arun(_watch, within=2 * EVENT_WITHIN_S)  # a watcher start, then the 20 s run
    assert event["state"] == "finished", event
    assert event["key"] == run.key


def test_killed_watcher_is_restarted(submit: Callable[..., RayTaskRun]) -> None:
    run = submit(8.0)

    async def _watch() -> tuple[list[dict[str, Any]], list[int]]:
        client = watcher.get_client(CONN)
        task = asyncio.create_task(_events(_trigger(run)))
        while not client.alive:  # the first poll starts the watcher
            await asyncio.sleep(0.1)
        first = client.proc
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)  # as Ray's core does to a driver whose cluster was replaced
        events = await task
        assert client.proc is not None
        return events, [first.pid, client.proc.pid, client.restarts]

    (event,), (first_pid, last_pid, restarts) = _arun(_watch)
    assert event["state"] == "finished", event
    assert restarts >= 1 and last_pid != first_pid


def test_each_connection_has_its_own_watcher(submit: Callable[..., RayTaskRun],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_RAY_SECOND", os.environ["AIRFLOW_CONN_RAY_DEFAULT"])  # same head
    one, two = submit(3.0), submit(3.0)

    async def _watch() -> tuple[list[list[dict[str, Any]]], set[int]]:
        results = await asyncio.gather(_events(_trigger(one)), _events(_trigger(two, conn_id="ray_second")))
        pids = {proc.pid for c in (watcher.get_client(CONN), watcher.get_client("ray_second"))
                if (proc := c.proc) is not None}
        return results, pids

    ((first,), (second,)), pids = _arun(_watch)
    assert (first["state"], first["ray_conn_id"]) == ("finished", CONN)
    assert (second["state"], second["ray_conn_id"]) == ("finished", "ray_second")
    assert len(pids) == 2


def _fake_task_instance(monkeypatch: pytest.MonkeyPatch, trigger: RayRunTrigger, state: str | None) -> None:
    """What the triggerer sets on a trigger, and what the API server answers about it."""
    trigger.task_instance = SimpleNamespace(dag_id="d", task_id="t", run_id="r", map_index=-1)
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states",
                        staticmethod(lambda **kw: {kw["run_ids"][0]: {kw["task_ids"][0]: state}}))


@pytest.mark.parametrize(("ti_state", "user_action", "timed_out", "cancelled"), [
    ("failed", True, False, True),  # marked failed: the triggerer calls on_kill, which cancels the run
    (None, False, False, True),  # no longer deferred, cancelled without the user-action message: run() cancels
    # Timed out: the triggerer cancels with the user-action message but skips on_kill; run() must decide.
    ("scheduled", True, True, True),
    ("deferred", True, False, False),  # the trigger moved to another triggerer: keep the run
    ("deferred", False, False, False),  # the triggerer is shutting down: keep the run
])
def test_cancellation_follows_the_task_state(submit: Callable[..., RayTaskRun], monkeypatch: pytest.MonkeyPatch,
                                             ti_state: str | None, user_action: bool, timed_out: bool,
                                             cancelled: bool) -> None:
    run = submit(60.0)  # outlives a slow watcher start: the cancel must find it running
    trigger = _trigger(run)
    _fake_task_instance(monkeypatch, trigger, ti_state)
    if timed_out:  # what the triggerer sets on every trigger it runs (workload.timeout_after)
        trigger.timeout_after = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)

    async def _cancel_midway() -> None:
        client = watcher.get_client(CONN)
        task = asyncio.create_task(_events(trigger))
        while not client.alive:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        assert not task.done()
        # What the triggerer does (triggerer_job_runner.run_trigger / cancel_triggers).
        task.cancel(trigger_mod.USER_ACTION_CANCEL_MSG if user_action else None)
        with pytest.raises(asyncio.CancelledError):
            await task
        if user_action and not timed_out:  # run_trigger skips on_kill for a timed-out trigger
            await trigger.on_kill()

    _arun(_cancel_midway)
    if cancelled:
        assert _state(run) == "cancelled"
    else:
        time.sleep(2.0)  # a cancel sent to the owner would have landed by now
        assert _state(run) == "running"
        run.cancel()  # the test's own cleanup: the 60 s sleep is not waited for


def test_unreachable_cluster_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch, connection: Any) -> None:
    from airflow_ray_provider.local_cluster import free_ports

    (port,) = free_ports(1)  # nothing listens there: every watcher start fails, and is retried with backoff
    conn_id = connection("ray_dead", extra={"address": f"127.0.0.1:{port}", "namespace": NAMESPACE})
    # Long enough for a watcher to start and report its connect error on a loaded machine (20-66 s seen;
    # with 5 s, every poll timed out first and the error never named why); the limit is passed by the
    # first or second failed start.
    monkeypatch.setattr(watcher, "REQUEST_TIMEOUT_S", 90.0)
    monkeypatch.setattr(trigger_mod, "UNREACHABLE_LIMIT_S", 5.0)
    key = f"trigger/{uuid.uuid4().hex}"
    trigger = RayRunTrigger(ray_conn_id=conn_id, namespace=NAMESPACE, shard=0, key=key, task_label="t",
                            poll_interval=0.5, signature=sign_run(conn_id, NAMESPACE, 0, key))
    (event,) = _arun(lambda: _events(trigger))
    assert event["status"] == "error", event
    assert "'ray_dead'" in event["message"] and key in event["message"]
    assert "could not start" in event["message"]  # why: the watcher's own connect error


def test_a_deferred_task_fails_as_a_held_one_does(capfd: pytest.CaptureFixture[str]) -> None:
    """``dag.test()`` runs the trigger in line: a remote exception fails both tasks with the same error.

    Also the regression test for a hang: the in-line run's event loop closed while the watcher
    subprocess waited on its stdin, and ``dag.test()`` never returned.
    """
    from tests.dags import deferrable_dags
    from tests.support.rows import task_states

    dr = deferrable_dags.deferred_failure_dag.test()
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert task_states(dr) == {"deferred": "failed", "held": "failed"}, output[-6000:]
    for task_id in ("deferred", "held"):
        assert f"Ray task ray_deferred_failure.{task_id} failed" in output, output[-6000:]
    assert output.count("ValueError: boom 7") >= 2, output[-6000:]
    assert "Deferring: the triggerer watches Ray task ray_deferred_failure.deferred" in output, output[-6000:]
