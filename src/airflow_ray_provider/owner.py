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
import logging
import os
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import ray

from airflow_ray_provider import worker

OWNER_NAME_PREFIX = "airflow-ray-owner"
SYSTEM_NAMESPACE = "airflow-ray-system"
FACTORY_NAME = "airflow-ray-owner-factory"
LAUNCHER_NAME = "airflow-ray-keeper-launcher"
KEEPER_START_TIMEOUT_S = 60.0
_MAX_LOG_LINES = 50_000
_WATCH_INTERVAL_S = 0.02

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """One object the owner holds: a submitted Ray task's result, an item of one, or an adopted value."""

    key: str
    ref: ray.ObjectRef
    lease_s: float
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


class TaskOwner:
    """Owns the ``ObjectRef`` of every Ray task submitted on Airflow's behalf."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._background: list[asyncio.Task[None]] = []

    def _start_background(self) -> None:
        if not self._background:
            loop = asyncio.get_running_loop()
            self._background = [loop.create_task(self._watch_loop()), loop.create_task(self._reap_abandoned())]

    async def submit(self, key: str, payload: list[ray.ObjectRef], options: dict[str, Any], lease_s: float) -> str:
        """Start ``worker.run_callable`` for ``payload`` (wrapped in a list so it stays a ref)."""
        if key in self._runs:
            raise KeyError(f"Ray task key {key!r} is already in use")
        me = ray.get_runtime_context().current_actor
        ref = worker.run_callable.options(**options).remote(payload[0], key, me)
        self._runs[key] = _Run(key=key, ref=ref, lease_s=lease_s)
        self._start_background()
        return ref.hex()

    async def _watch_loop(self) -> None:
        """Notice finished runs without fetching their (possibly huge) results into this actor."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            pending = [r for r in self._runs.values() if not r.done.is_set() and not r.settling]
            if not pending:
                continue
            try:
                ready, _ = ray.wait([r.ref for r in pending], num_returns=len(pending), timeout=0,
                                    fetch_local=False)
            except Exception:  # one bad round must not stop watching every run
                log.exception("Watching %d Ray runs failed; retrying", len(pending))
                continue
            ready_set = set(ready)
            for run in pending:
                if run.ref in ready_set:
                    run.settling = True
                    asyncio.get_running_loop().create_task(self._settle(run))

    async def _settle(self, run: _Run) -> None:
        """Decide success or failure; only small (inlined) results are ever fetched here."""
        _locate_now([run])
        if run.in_store and run.state != "cancelled" and "returned_type" in run.events:
            state = "finished"  # errors are small objects; a large stored result is a value
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
        run.state = state
        run.finished_at = time.time()
        run.done.set()
        run.changed.set()

    async def _reap_abandoned(self) -> None:
        """Cancel runs whose Airflow process stopped polling (killed with SIGKILL, lost host)."""
        while True:
            await asyncio.sleep(1.0)
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
            with contextlib.suppress(TimeoutError):
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

    async def _locate(self, runs: list[_Run]) -> None:
        pending = [r.ref for r in runs]
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
            if pending:
                await asyncio.sleep(_WATCH_INTERVAL_S)
        _locate_now(runs)

    async def adopt(self, key: str, payload: list[ray.ObjectRef], described: dict[str, Any]) -> dict[str, Any]:
        """Take ownership of a value ``ray.put`` by a short-lived process (a plain task's large XCom)."""
        if key in self._runs:
            raise KeyError(f"Ray object key {key!r} is already in use")
        ref = worker.adopt.options(name=f"adopt:{key}").remote(payload)
        run = _Run(key=key, ref=ref, lease_s=0.0, state="finished", events={"described": described})
        await self._locate([run])
        try:
            if not run.in_store:
                await ref  # small or failed: fetching is cheap and surfaces the error
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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.done.wait(), 10.0)
        run.changed.set()
        return True

    async def release(self, keys: list[str]) -> int:
        """Drop the refs for ``keys`` so Ray can free the objects."""
        return sum(self._runs.pop(k, None) is not None for k in keys)

    async def keys(self) -> list[str]:
        return list(self._runs)

    async def inventory(self) -> dict[str, dict[str, Any]]:
        """Every key with its state, finish time and size: what garbage collection decides on."""
        return {k: {"state": r.state if r.done.is_set() else "running", "finished_at": r.finished_at,
                    "size": r.size} for k, r in self._runs.items()}

    async def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()


class OwnerFactory:
    """Lives in the keeper's job and creates owner actors there (see ``keeper.py``)."""

    def ensure(self, namespace: str, shard: int) -> str:
        handle = _create_owner(namespace, shard)
        return ray.get(handle.ping.remote())

    def ping(self) -> int:
        return os.getpid()


class KeeperLauncher:
    """A detached actor that starts the keeper driver inside the cluster and restarts it if it died."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = os.path.join(tempfile.gettempdir(), f"airflow-ray-keeper-{os.getpid()}.log")

    def ensure(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        if _factory_or_none() is not None:
            return "running"
        if self._proc is None or self._proc.poll() is not None:
            env = {k: v for k, v in os.environ.items() if k not in ("RAY_JOB_ID", "RAY_ADDRESS")}
            with open(self._log_path, "ab") as out:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "airflow_ray_provider.keeper", ray.get_runtime_context().gcs_address],
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


def _locate_now(runs: list[_Run]) -> None:
    """Record size, nodes and whether each finished object sits in the store, without fetching it.

    If Ray cannot say, ``in_store`` stays False and callers fetch, which is right for small objects.
    """
    try:
        infos = ray.experimental.get_object_locations([r.ref for r in runs])
    except Exception:  # noqa: BLE001 - see the docstring
        return
    for run in runs:
        info = infos.get(run.ref) or {}
        run.size = info.get("object_size") or run.size
        run.node_ids = list(info.get("node_ids") or [])
        run.in_store = bool(run.size) and bool(run.node_ids or info.get("did_spill"))


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
    ray.get(launcher.ensure.remote(KEEPER_START_TIMEOUT_S), timeout=KEEPER_START_TIMEOUT_S + 30)
    factory = _factory_or_none()
    if factory is None:
        raise RuntimeError("the keeper reported ready but its factory actor is gone")
    return factory


def shard_for(key: str, shards: int) -> int:
    return zlib.crc32(key.encode()) % max(1, shards)


def owner_name(shard: int) -> str:
    return f"{OWNER_NAME_PREFIX}-{shard}"


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


def get_owner(namespace: str, shard: int) -> Any:
    """The owner actor for ``shard``, created through the keeper on first use.

    Without a keeper (it could not start) the caller creates the owner itself: results
    still outlive the caller, but Ray no longer keeps warm workers between tasks.
    """
    with contextlib.suppress(ValueError):
        return ray.get_actor(owner_name(shard), namespace=namespace)
    try:
        ray.get(_keeper_factory().ensure.remote(namespace, shard), timeout=KEEPER_START_TIMEOUT_S)
        return ray.get_actor(owner_name(shard), namespace=namespace)
    except Exception as exc:  # noqa: BLE001 - degrade to a slower but correct owner
        log.warning("Ray owner keeper unavailable (%s); creating owner %s from this process, so Ray "
                    "workers will not be reused between tasks", exc, owner_name(shard))
        return _create_owner(namespace, shard)
