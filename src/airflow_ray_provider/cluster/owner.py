"""The detached owner actor: submits Ray tasks so their results outlive Airflow processes.

Ray 2.56+ removed ``ray.put(_owner=...)``: an object belongs to whoever submitted
the task that produced it. An Airflow task process is short-lived, so it does not
submit the Ray task itself; it asks a named, detached, async actor to do so. The
actor keeps the ``ObjectRef`` under a key, and any later process (a downstream
task, the XCom backend) gets the ref back by key.

There is no global lock: the actor is async with a high ``max_concurrency`` and
many runs are in flight at once; keys are spread over ``shards`` actors.

The owner actors are created by the keeper's factory (see ``keeper.py``), so they
belong to a job that stays alive and Ray keeps their warm workers between tasks.

This module runs inside the Ray cluster and must not import Airflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from airflow_ray_provider.cluster import ray_compat, worker
from airflow_ray_provider.cluster.naming import (  # noqa: F401 - owner's names, used through this module too
    OWNER_NAME_PREFIX,
    STATE_ONLY_OFFSET,
    owner_label,
    owner_name,
    shard_for,
)
from airflow_ray_provider.exceptions import RayFeatureUnavailable, RayWaitTimeout

SYSTEM_NAMESPACE = "airflow-ray-system"
FACTORY_NAME = "airflow-ray-owner-factory"
LAUNCHER_NAME = "airflow-ray-keeper-launcher"
KEEPER_START_TIMEOUT_S = 60.0
_MAX_LOG_LINES = 50_000
_WATCH_INTERVAL_S = 0.02
# Ray keeps objects up to this size inline (max_direct_call_object_size, 100 KiB by default):
# fetching one into the owner actor is cheap; anything larger may be gigabytes.
_CHEAP_FETCH_BYTES = 100 * 1024
# How long a large result's nodes are waited for after its task ended (see _settle): 2 s at most.
# Up to 10 s for a large result's location: 2 s was not enough on a loaded 2-core machine (the two-host test's
# 16 MiB array on the worker node was settled without its node). Only large, not yet located results wait.
_LOCATE_RETRIES, _LOCATE_RETRY_S = 100, 0.1
# runtime_env fields Ray installs on the node before the task can start (pip can take minutes, and Ray tries a
# failed install 3 times before the task fails): while the task waits on them, the log says so at these ages.
SETUP_FIELDS = ("pip", "uv", "conda", "container", "image_uri")
SETUP_NOTICE_AT_S = (10.0, 30.0, 60.0, 120.0, 240.0, 480.0)
SETUP_NOTICE_EVERY_S = 600.0  # after the last of SETUP_NOTICE_AT_S

log = logging.getLogger(__name__)

KEEPER_RUNTIME_ENV = "AIRFLOW_RAY_KEEPER_RUNTIME_ENV"  # JSON: the runtime_env of the keeper's job


@dataclass
class _Run:
    """One object the owner holds: a submitted Ray task's result, an item of one, or an adopted value."""

    key: str
    ref: ray.ObjectRef
    lease_s: float
    hold_s: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "running"  # running | finished | failed | cancelled
    error: str | None = None
    logs: list[str] = field(default_factory=list)
    events: dict[str, Any] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    settling: bool = False
    finished_at: float | None = None  # wall clock, for retention
    size: int | None = None
    node_ids: list[str] = field(default_factory=list)
    in_store: bool = False  # held in the shared-memory store (or spilled), not inlined: a value, never an error
    # Placement groups the try made (reported by worker.run_callable): Ray scopes them to the keeper's job,
    # which never ends, so a try that does not finish must have them removed here. Per attempt of the run.
    attempt: str | None = None
    placement_groups: list[Any] = field(default_factory=list)


class TaskOwner:
    """Owns the ``ObjectRef`` of every Ray task submitted on Airflow's behalf."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        # Submitted runs not yet settling: what the watch loop polls, so its round costs nothing per held result
        # (an owner may hold tens of thousands of finished ones).
        self._watching: dict[str, _Run] = {}
        self._background: list[asyncio.Task[None]] = []
        # One-off tasks (settling a run, reporting its runtime_env install): the loop keeps only a weak reference
        # to a task, so one nobody holds can be collected before it ends.
        self._spawned: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    def _start_background(self) -> None:
        if not self._background:
            loop = asyncio.get_running_loop()
            self._background = [loop.create_task(self._watch_loop()), loop.create_task(self._reap_abandoned())]

    async def submit(self, key: str, payload: list[ray.ObjectRef], options: dict[str, Any], lease_s: float,
                     hold_s: float = 0.0) -> str:
        """Start ``worker.run_callable`` for ``payload`` (wrapped in a list so it stays a ref).

        ``hold_s``: how long after it ends the result is kept even if no XCom row names it yet (a durable
        task's retry may still come for it); garbage collection reads it from ``inventory``.
        """
        if key in self._runs:
            raise KeyError(f"Ray task key {key!r} is already in use")
        me = ray.get_runtime_context().current_actor
        ref = worker.run_callable.options(**options).remote(payload[0], key, me)
        run = self._runs[key] = self._watching[key] = _Run(key=key, ref=ref, lease_s=lease_s, hold_s=hold_s)
        self._start_background()
        setup = installs(options.get("runtime_env"))
        if setup:
            self._spawn(self._report_setup(run, setup))
        return ref.hex()

    async def _report_setup(self, run: _Run, setup: str) -> None:
        """Until ``run``'s worker starts, say in its log that Ray is installing its runtime_env, and for how long.

        Ray reports nothing to the submitter while it installs (a failed pip install is tried 3 times before the
        task fails with pip's output), so without this a task log shows nothing for minutes.
        """
        started = time.monotonic()
        name = f"runtime_env_setup-{ray.get_runtime_context().get_job_id()}.log"
        try:
            where = f"{name} in its Ray session's logs (here: {ray_compat.session_logs_dir()})"
        except RayFeatureUnavailable:
            where = f"{name} in its Ray session's logs"
        for at in setup_notice_ages():
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            if run.done.is_set() or "pid" in run.events or self._runs.get(run.key) is not run:
                return  # the worker has started, the run ended, or it was released
            await self.append_log(run.key, (
                f"[airflow-ray] Ray is still preparing this task's runtime_env ({setup}) after {at:.0f} s; the "
                f"task starts when it is ready, and fails with the installer's output if Ray gives up (after 3 "
                f"tries). The install's output is on the node that runs the task, in {where}."))

    async def _watch_loop(self) -> None:
        """Notice finished runs without fetching their (possibly huge) results into this actor."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            if self._watching:
                self._watch_round()

    def _watch_round(self) -> None:
        # A method of its own so its locals (the runs, their refs) die with the round: kept in the loop's
        # frame, the last round's refs outlived their release and pinned the objects in the store.
        pending = list(self._watching.values())
        try:
            ready, _ = ray.wait([r.ref for r in pending], num_returns=len(pending), timeout=0, fetch_local=False)
        except Exception:  # one bad round must not stop watching every run
            log.exception("Watching %d Ray runs failed; retrying", len(pending))
            return
        ready_set = set(ready)
        for run in pending:
            if run.ref in ready_set:
                run.settling = True
                self._watching.pop(run.key, None)
                self._spawn(self._settle(run))

    async def _settle(self, run: _Run) -> None:
        """Decide success or failure; only small (inlined) results are ever fetched here."""
        located = _locate_now([run])
        returned = run.state != "cancelled" and "returned_type" in run.events
        # Ray hears where a stored object lives from the node that made it, which may come a moment after the
        # task's reply: a large result with no node yet is asked again, not fetched here or left without its
        # nodes in the XCom reference (seen in the two-node test, a worker node's 16 MiB array).
        for _ in range(_LOCATE_RETRIES):
            if not awaits_location(run, returned, located):
                break
            await asyncio.sleep(_LOCATE_RETRY_S)
            located = _locate_now([run])
        if returned and (run.in_store or (not located and not _cheap_to_fetch(run))):
            state = "finished"  # errors are small objects; a large stored result is a value
            if not located:
                # Without locations a large value and an error look alike; pulling a result of unknown
                # size into this actor could take all its memory, so trust the worker's "it returned".
                log.error("Ray run %s: could not locate its result (size estimate %s); counting it as finished "
                          "without fetching it into the owner actor. An error hidden in it (a return value Ray "
                          "could not store) will surface when the result is read",
                          run.key, (run.events.get("described") or {}).get("size_estimate"))
        else:
            try:
                await run.ref
                state = "finished"
            except ray.exceptions.TaskCancelledError:
                state = "cancelled"
            except Exception as exc:  # noqa: BLE001 - any remote error is kept as text for the Airflow log
                state = "failed"
                run.error = str(exc)
        if run.state == "cancelled":
            state = "cancelled"
        if state != "finished":  # failed, cancelled, reaped or its worker died: nothing will use them now
            try:
                self._release_made(run, f"the try ended {state}")
            except Exception:  # the run must still settle, or its Airflow task would wait forever
                log.exception("Ray run %s: releasing what its try made failed", run.key)
        run.state = state
        run.finished_at = time.time()
        run.done.set()
        run.changed.set()

    async def _reap_abandoned(self) -> None:
        """Cancel runs whose Airflow process stopped polling (killed with SIGKILL, lost host)."""
        while True:
            await asyncio.sleep(1.0)
            self._reap_round()

    def _reap_round(self) -> None:
        # Its own frame, like _watch_round: a loop variable left in the loop's frame would hold a released run.
        now = time.monotonic()
        for run in list(self._runs.values()):
            if run.state == "running" and not run.done.is_set() and now - run.last_seen > run.lease_s:
                run.state = "cancelled"
                run.error = f"no Airflow process polled this run for {run.lease_s:.0f}s; cancelled"
                try:
                    ray.cancel(run.ref, force=True, recursive=True)
                except Exception:  # e.g. it finished meanwhile; the others still get reaped
                    log.exception("Cancelling abandoned Ray run %s failed", run.key)
                run.changed.set()

    async def set_lease(self, key: str, lease_s: float, hold_s: float = 0.0) -> bool:
        """A later try re-attached to ``key`` (durable): from now on its lease and hold are that try's."""
        run = self._runs.get(key)
        if run is None:
            return False
        run.lease_s = lease_s
        run.hold_s = hold_s
        run.last_seen = time.monotonic()
        return True

    async def append_log(self, key: str, chunk: str, events: dict[str, Any] | None = None) -> None:
        """Called by the Ray worker running ``key`` with its captured output."""
        run = self._runs.get(key)
        if run is None:
            return
        if chunk:
            run.logs.extend(chunk.splitlines())
            if len(run.logs) > _MAX_LOG_LINES:
                del run.logs[: len(run.logs) - _MAX_LOG_LINES]
        if events:
            run.events.update(events)
        run.changed.set()

    async def poll(self, key: str, log_offset: int, timeout: float) -> dict[str, Any]:
        """Wait up to ``timeout`` for news about ``key``; renews the run's lease."""
        run = self._runs.get(key)
        if run is None:
            return {"state": "unknown", "logs": [], "log_offset": log_offset, "events": {}, "error": None}
        run.last_seen = time.monotonic()
        if not run.done.is_set() and len(run.logs) <= log_offset:
            run.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError: the two differ on 3.10
                await asyncio.wait_for(run.changed.wait(), timeout)
        run.last_seen = time.monotonic()
        new_logs = run.logs[log_offset:]
        state = run.state if run.done.is_set() or run.state == "cancelled" else "running"
        return {
            "state": state,
            "logs": new_logs,
            "log_offset": log_offset + len(new_logs),
            "events": dict(run.events),
            "error": run.error,
        }

    def _describe(self, run: _Run) -> dict[str, Any]:
        meta = dict(run.events.get("described") or {})
        return {"key": run.key, "state": run.state, "size": run.size or meta.get("size_estimate"),
                "node_ids": run.node_ids, "meta": meta, "finished_at": run.finished_at}

    async def describe(self, key: str) -> dict[str, Any]:
        """Where and what the finished object for ``key`` is (for the XCom reference)."""
        run = self._runs.get(key)
        if run is None:
            raise KeyError(f"no Ray object under key {key!r}")
        await run.done.wait()
        run.logs = []  # the Airflow side has read them; the object itself may be kept for days
        return self._describe(run)

    async def split(self, key: str, names: list[Any] | None) -> list[dict[str, Any]]:
        """Replace the list/dict object under ``key`` by one object per item (keys ``key#i``).

        Each item is then addressable alone: a mapped task or one of ``multiple_outputs``
        gets only its item. The whole object is released once the items exist.
        """
        run = self._runs.get(key)
        if run is None:
            raise KeyError(f"no Ray object under key {key!r}")
        length = run.events.get("described", {}).get("length")
        if names is None and length is None:
            raise ValueError(f"the object under {key!r} has no known length, so it cannot be split")
        count = len(names) if names is not None else int(length)
        items: list[_Run] = []
        if count:
            refs = worker.split_items.options(num_returns=count + 1, name=f"split:{key}").remote(run.ref, names)
            metas = await refs[-1]
            for i, (ref, meta) in enumerate(zip(refs[:-1], metas, strict=True)):
                item = _Run(key=f"{key}#{i}", ref=ref, lease_s=run.lease_s, state="finished",
                            events={"described": meta}, finished_at=time.time())
                item.done.set()
                items.append(item)
            await self._locate(items)
        for item in items:
            self._runs[item.key] = item
        self._runs.pop(key, None)  # releases the whole object and its logs
        return [self._describe(item) for item in items]

    async def _locate(self, runs: list[_Run]) -> bool:
        """Wait (without fetching) until every run's object exists, then locate them; False if Ray could not say."""
        pending = [r.ref for r in runs]
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
            if pending:
                await asyncio.sleep(_WATCH_INTERVAL_S)
        return _locate_now(runs)

    async def adopt(self, key: str, payload: list[ray.ObjectRef], described: dict[str, Any]) -> dict[str, Any]:
        """Take ownership of a value ``ray.put`` by a short-lived process (a plain task's large XCom)."""
        if key in self._runs:
            raise KeyError(f"Ray object key {key!r} is already in use")
        ref = worker.adopt.options(name=f"adopt:{key}").remote(payload)
        run = _Run(key=key, ref=ref, lease_s=0.0, state="finished", events={"described": described})
        located = await self._locate([run])
        try:
            if not run.in_store and (located or _cheap_to_fetch(run)):
                await ref  # small or failed: fetching is cheap and surfaces the error
            elif not located:
                log.error("Adopting %s: could not locate the copied value (size estimate %s); not fetching "
                          "it into the owner actor to check it", key, described.get("size_estimate"))
        except Exception as exc:
            raise RuntimeError(f"could not copy the value for {key!r} into the object store: {exc}") from exc
        run.finished_at = time.time()
        run.done.set()
        self._runs[key] = run
        return self._describe(run)

    async def get(self, key: str) -> list[ray.ObjectRef]:
        """The result ref, wrapped in a list so Ray does not resolve it on the way."""
        run = self._runs.get(key)
        if run is None:
            raise KeyError(f"no Ray object under key {key!r} (released, or the owner actor restarted)")
        return [run.ref]

    async def get_many(self, keys: list[str]) -> list[ray.ObjectRef | None]:
        """Refs for ``keys`` (``None`` where a key is unknown); a list, so Ray leaves them unresolved."""
        return [run.ref if (run := self._runs.get(k)) is not None else None for k in keys]

    async def cancel(self, key: str) -> bool:
        """Cancel the running task for ``key`` and everything it spawned."""
        run = self._runs.get(key)
        if run is None or run.done.is_set():
            return False
        run.state = "cancelled"
        ray.cancel(run.ref, force=True, recursive=True)
        # Returns once Ray reports the task ended, so callers know nothing still runs.
        with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError: the two differ on 3.10
            await asyncio.wait_for(run.done.wait(), 10.0)
        # Normally _settle has released them; if Ray has not reported the end yet, the try is being killed anyway.
        self._release_made(run, "the try was cancelled")
        run.changed.set()
        return True

    async def note_created(self, key: str, attempt: str, placement_groups: list[Any]) -> None:
        """Called by the worker running ``key``: this attempt made ``placement_groups``.

        A new ``attempt`` means Ray retried the task after its worker died: what the dead attempt made
        is released now, or on a small cluster the retry waits forever for the CPUs it holds.
        """
        run = self._runs.get(key)
        if run is None:
            return  # released, or this owner restarted: without the run it cannot tell whose they are
        if run.attempt is not None and run.attempt != attempt:
            self._release_made(run, "Ray retried the task after its worker died")
        run.attempt = attempt
        run.placement_groups.extend(placement_groups)
        if run.done.is_set() and run.state != "finished":
            self._release_made(run, "the try had already ended")  # arrived after _settle

    def _release_made(self, run: _Run, why: str) -> None:
        """Remove the placement groups ``run``'s try made, saying so in the run's log (the Airflow task log).

        Only ids the try itself reported are touched: other runs share this owner and the keeper's job.
        """
        made, run.placement_groups = run.placement_groups, []
        released = []
        for pg in made:
            try:
                if ray.util.placement_group_table(pg).get("state") == "REMOVED":
                    continue  # the callable removed it itself
                ray.util.remove_placement_group(pg)
                released.append(f"{pg.id.hex()} {pg.bundle_cache or ''}".rstrip())
            except Exception:  # one failure must not keep the others' CPUs held
                log.exception("Ray run %s: could not remove placement group %s", run.key, pg.id.hex())
        if released:
            line = f"Released {len(released)} placement group(s) this try made ({why}): {'; '.join(released)}"
            log.warning("Ray run %s: %s", run.key, line)
            run.logs.append(line)
            run.changed.set()

    async def release(self, keys: list[str]) -> int:
        """Drop the refs for ``keys`` so Ray can free the objects."""
        for k in keys:
            self._watching.pop(k, None)
        return sum(self._runs.pop(k, None) is not None for k in keys)

    async def keys(self) -> list[str]:
        return list(self._runs)

    async def inventory(self) -> dict[str, dict[str, Any]]:
        """Every key with its state, finish time and size: what garbage collection decides on."""
        return {k: {"state": r.state if r.done.is_set() else "running", "finished_at": r.finished_at,
                    "size": r.size, "hold_s": r.hold_s} for k, r in self._runs.items()}

    async def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()


class OwnerFactory:
    """Lives in the keeper's job and creates owner actors there (see ``keeper.py``)."""

    def ensure(self, namespace: str, shard: int) -> str:
        handle = _create_owner(namespace, shard)
        # Bounded like the Airflow side's wait for this call (get_owner), so a stuck owner frees this thread.
        return ray.get(handle.ping.remote(), timeout=KEEPER_START_TIMEOUT_S)

    def ping(self) -> int:
        return os.getpid()


class KeeperLauncher:
    """A detached actor that starts the keeper driver inside the cluster and restarts it if it died."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        # Never a predictable, world-readable name in /tmp: the log goes into this Ray session's logs dir
        # (inside the embedded head's 0700 temp dir), created 0600 with O_EXCL under a random name.
        try:
            logs_dir = ray_compat.session_logs_dir()
        except RayFeatureUnavailable:  # not in a Ray worker (never expected): a fresh 0700 dir of our own
            logs_dir = tempfile.mkdtemp(prefix="airflow-ray-keeper-")
        fd, self._log_path = tempfile.mkstemp(prefix=f"airflow-ray-keeper-{os.getpid()}-", suffix=".log",
                                              dir=logs_dir)
        os.close(fd)

    def ensure(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        if _factory_or_none() is not None:
            return "running"
        if self._proc is None or self._proc.poll() is not None:
            env = {k: v for k, v in os.environ.items() if k not in ("RAY_JOB_ID", "RAY_ADDRESS")}
            # The keeper's job must see the provider code shipped with this actor's job (bundle.py):
            # the owners it creates, and the tasks they submit, inherit it.
            shipped = [u for u in (ray.get_runtime_context().runtime_env or {}).get("py_modules") or []
                       if isinstance(u, str) and u.startswith("gcs://")]
            env[KEEPER_RUNTIME_ENV] = json.dumps({"py_modules": shipped} if shipped else {})
            # O_NOFOLLOW: Ray's logs dir may be 0777 (Ray's default temp dir); never follow a planted link.
            with os.fdopen(os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW), "ab") as out:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "airflow_ray_provider.cluster.keeper",
                     ray.get_runtime_context().gcs_address],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )
        while time.monotonic() < deadline:
            if _factory_or_none() is not None:
                return "started"
            if self._proc.poll() is not None:
                with open(self._log_path, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"the keeper exited with code {self._proc.returncode}: {tail}")
            time.sleep(0.2)
        raise TimeoutError(f"the keeper did not start within {timeout:.0f}s; see {self._log_path}")


def installs(runtime_env: dict[str, Any] | None) -> str:
    """What Ray must install for ``runtime_env`` before a task can start (``"pip: a, b"``), or ``""``."""
    found = []
    for name in SETUP_FIELDS:
        spec = (runtime_env or {}).get(name)
        if not spec:
            continue
        packages = spec.get("packages") if isinstance(spec, dict) else spec
        if isinstance(packages, (list, tuple)):
            shown = ", ".join(str(p) for p in packages[:5]) + (", ..." if len(packages) > 5 else "")
            found.append(f"{name}: {shown}")
        else:
            found.append(name)
    return "; ".join(found)


def setup_notice_ages() -> Iterator[float]:
    """The ages (seconds since submission) at which a waiting runtime_env is reported: then every 10 min."""
    yield from SETUP_NOTICE_AT_S
    at = SETUP_NOTICE_AT_S[-1]
    while True:
        at += SETUP_NOTICE_EVERY_S
        yield at


def _locate_now(runs: list[_Run]) -> bool:
    """Record size, nodes and whether each finished object sits in the store, without fetching it.

    Returns False when Ray could not say for some run: ``in_store`` then stays False, and callers
    must not fetch unless the object is known to be small (:func:`_cheap_to_fetch`).
    """
    refs = [r.ref for r in runs]
    keys = ", ".join(r.key for r in runs)
    try:
        infos = ray_compat.object_locations(refs)
    except Exception as exc:  # noqa: BLE001 - logged; the local lookup below is the fallback
        log.warning("get_object_locations failed for Ray run(s) %s (%r); asking this actor's own core worker",
                    keys, exc)
        try:
            # This actor submitted the tasks, so it owns the objects: its core worker knows their
            # size and nodes without any RPC.
            infos = ray_compat.local_object_locations(refs)
        except Exception:
            log.exception("Could not locate the objects of Ray run(s) %s either locally", keys)
            return False
    located = True
    for run in runs:
        info = infos.get(run.ref)
        if not info:  # Ray leaves out objects whose lookup failed
            log.warning("Ray returned no location for the object of Ray run %s", run.key)
            located = False
            continue
        run.size = info.get("object_size") or run.size
        run.node_ids = list(info.get("node_ids") or [])
        run.in_store = bool(run.size) and bool(run.node_ids or info.get("did_spill"))
    return located


def _cheap_to_fetch(run: _Run) -> bool:
    """Whether the object is small enough to fetch here: by the size Ray measured (known once it is located),
    else by the Ray worker's own estimate (only for types it can size: a list or dict has none)."""
    if run.size is not None and run.size > 0:
        return run.size <= _CHEAP_FETCH_BYTES
    estimate = (run.events.get("described") or {}).get("size_estimate")
    return isinstance(estimate, int) and estimate <= _CHEAP_FETCH_BYTES


def awaits_location(run: _Run, returned: bool, located: bool) -> bool:
    """Whether a finished run's object is asked for its location again before it is settled: only a large value
    Ray has not placed on a node yet. A small one is inline in its task's reply and never gets a node; asking
    again kept every small list or dict result (which the worker cannot size) waiting 10 s (the retries)."""
    return returned and located and not run.in_store and not _cheap_to_fetch(run)


# The keeper and the owner actors live on the head node. Worker nodes come and go (autoscaling, spot
# nodes, a crash); an owner on one of them would take every result it owns down with it. The head's
# loss ends the cluster anyway. Ray's own state actors are pinned the same way.
ON_HEAD_NODE = {"node:__internal_head__": 0.001}


def _factory_or_none() -> Any:
    try:
        return ray.get_actor(FACTORY_NAME, namespace=SYSTEM_NAMESPACE)
    except ValueError:
        return None


def _keeper_factory() -> Any:
    factory = _factory_or_none()
    if factory is not None:
        return factory
    launcher = ray.remote(KeeperLauncher).options(
        name=LAUNCHER_NAME, namespace=SYSTEM_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, resources=ON_HEAD_NODE, max_restarts=-1,
    ).remote()
    bounded_get(launcher.ensure.remote(KEEPER_START_TIMEOUT_S), timeout=KEEPER_START_TIMEOUT_S + 30,
                what=f"the keeper launcher actor {LAUNCHER_NAME!r} (namespace {SYSTEM_NAMESPACE!r}) "
                     f"starting the keeper")
    factory = _factory_or_none()
    if factory is None:
        raise RuntimeError("the keeper reported ready but its factory actor is gone")
    return factory


def _create_owner(namespace: str, shard: int) -> Any:
    return ray.remote(TaskOwner).options(
        name=owner_name(shard),
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_concurrency=10_000,
        num_cpus=0,
        resources=ON_HEAD_NODE,
        max_restarts=-1,
    ).remote()


def cluster_address() -> str:
    """The GCS address this process is connected to, for error messages."""
    try:
        return ray.get_runtime_context().gcs_address or "an unknown address"
    except Exception as exc:  # noqa: BLE001 - only ever decorates another error message
        log.debug("Could not read this process's Ray cluster address: %s", exc)
        return "an unknown address"


# A log offset past any run's log: ``TaskOwner.poll`` then ships no lines, only the state (and renews the lease).


def poll_state(owner: Any, key: str, *, timeout: float, what: str) -> dict[str, Any]:
    """``owner``'s answer about ``key`` without its log, at once: ``{"state", "error", ...}``."""
    return bounded_get(owner.poll.remote(key, STATE_ONLY_OFFSET, 0.0), timeout=timeout, what=what)


def bounded_get(ref: Any, *, timeout: float, what: str) -> Any:
    """``ray.get(ref)`` that gives up after ``timeout`` seconds with a :class:`RayWaitTimeout`.

    ``what`` names what the caller waited for, e.g. ``owner_mod.owner_label(namespace, shard)
    + ": poll of key 'dag/run/task/-1/1/ab12cd34'"``; the message adds the timeout and the cluster.
    Errors raised by the remote side (``RayTaskError``, ``RayActorError``...) pass through unchanged.
    """
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError as exc:
        raise RayWaitTimeout(
            f"No answer from {what} within {timeout:g}s (Ray cluster at {cluster_address()})"
        ) from exc


def get_owner(namespace: str, shard: int) -> Any:
    """The owner actor for ``shard``, created through the keeper on first use.

    Without a keeper (it could not start) the caller creates the owner itself: results
    still outlive the caller, but Ray no longer keeps warm workers between tasks.
    """
    with contextlib.suppress(ValueError):  # not created yet: the usual first call
        return ray.get_actor(owner_name(shard), namespace=namespace)
    try:
        bounded_get(_keeper_factory().ensure.remote(namespace, shard), timeout=KEEPER_START_TIMEOUT_S,
                    what=f"the keeper's factory actor {FACTORY_NAME!r} creating {owner_label(namespace, shard)}")
        return ray.get_actor(owner_name(shard), namespace=namespace)
    except Exception as exc:  # noqa: BLE001 - degrade to a slower but correct owner
        log.warning("Ray owner keeper unavailable (%s); creating %s from this process, so Ray "
                    "workers will not be reused between tasks", exc, owner_label(namespace, shard))
        return _create_owner(namespace, shard)
