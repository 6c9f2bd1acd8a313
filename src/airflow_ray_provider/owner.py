"""The detached owner actor: submits Ray tasks so their results outlive Airflow processes.

Ray 2.56+ removed ``ray.put(_owner=...)``: an object belongs to whoever submitted
the task that produced it. An Airflow task process is short-lived, so it does not
submit the Ray task itself; it asks a named, detached, async actor to do so. The
actor keeps the ``ObjectRef`` under a key, and any later process (a downstream
task, the XCom backend) gets the ref back by key.

There is no global lock: the actor is async with a high ``max_concurrency`` and
many runs are in flight at once; keys are spread over ``shards`` actors.

This module runs inside the Ray cluster and must not import Airflow.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import ray

from airflow_ray_provider import worker

OWNER_NAME_PREFIX = "airflow-ray-owner"
_MAX_LOG_LINES = 50_000


@dataclass
class _Run:
    """One submitted Ray task and what the Airflow side needs to follow it."""

    key: str
    ref: ray.ObjectRef
    lease_s: float
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "running"  # running | finished | failed | cancelled
    error: str | None = None
    logs: list[str] = field(default_factory=list)
    events: dict[str, Any] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None


class TaskOwner:
    """Owns the ``ObjectRef`` of every Ray task submitted on Airflow's behalf."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def submit(self, key: str, payload: list[ray.ObjectRef], options: dict[str, Any], lease_s: float) -> str:
        """Start ``worker.run_callable`` for ``payload`` (wrapped in a list so it stays a ref)."""
        if key in self._runs:
            raise KeyError(f"Ray task key {key!r} is already in use")
        me = ray.get_runtime_context().current_actor
        ref = worker.run_callable.options(**options).remote(payload[0], key, me)
        run = _Run(key=key, ref=ref, lease_s=lease_s)
        self._runs[key] = run
        run.watcher = asyncio.get_running_loop().create_task(self._watch(run))
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_abandoned())
        return ref.hex()

    async def _watch(self, run: _Run) -> None:
        try:
            await run.ref
            run.state = "finished"
        except ray.exceptions.TaskCancelledError:
            run.state = "cancelled"
        except Exception as exc:  # noqa: BLE001 - any remote error is kept as text for the Airflow log
            run.state = "cancelled" if run.state == "cancelled" else "failed"
            run.error = str(exc)
        run.changed.set()

    async def _reap_abandoned(self) -> None:
        """Cancel runs whose Airflow process stopped polling (killed with SIGKILL, lost host)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for run in list(self._runs.values()):
                if run.state == "running" and now - run.last_seen > run.lease_s:
                    run.state = "cancelled"
                    run.error = f"no Airflow process polled this run for {run.lease_s:.0f}s; cancelled"
                    ray.cancel(run.ref, force=True, recursive=True)
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
        if run.state == "running" and len(run.logs) <= log_offset:
            run.changed.clear()
            try:
                await asyncio.wait_for(run.changed.wait(), timeout)
            except TimeoutError:
                pass
        run.last_seen = time.monotonic()
        new_logs = run.logs[log_offset:]
        return {
            "state": run.state,
            "logs": new_logs,
            "log_offset": log_offset + len(new_logs),
            "events": dict(run.events),
            "error": run.error,
        }

    async def get(self, key: str) -> list[ray.ObjectRef]:
        """The result ref, wrapped in a list so Ray does not resolve it on the way."""
        run = self._runs.get(key)
        if run is None:
            raise KeyError(f"no Ray object under key {key!r} (released, or the owner actor restarted)")
        return [run.ref]

    async def cancel(self, key: str) -> bool:
        """Cancel the running task for ``key`` and everything it spawned."""
        run = self._runs.get(key)
        if run is None or run.state != "running":
            return False
        run.state = "cancelled"
        ray.cancel(run.ref, force=True, recursive=True)
        if run.watcher is not None:
            # Returns once Ray reports the task ended, so callers know nothing still runs.
            await asyncio.wait([run.watcher], timeout=10.0)
        run.changed.set()
        return True

    async def release(self, keys: list[str]) -> int:
        """Drop the refs for ``keys`` so Ray can free the objects."""
        return sum(self._runs.pop(k, None) is not None for k in keys)

    async def keys(self) -> list[str]:
        return list(self._runs)

    async def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()


def shard_for(key: str, shards: int) -> int:
    return zlib.crc32(key.encode()) % max(1, shards)


def owner_name(shard: int) -> str:
    return f"{OWNER_NAME_PREFIX}-{shard}"


def get_owner(namespace: str, shard: int) -> ray.actor.ActorHandle:
    """The owner actor for ``shard``, created on first use (``get_if_exists`` makes the race safe)."""
    actor_cls = ray.remote(TaskOwner)
    return actor_cls.options(
        name=owner_name(shard),
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_concurrency=10_000,
        num_cpus=0,
        max_restarts=-1,
    ).remote()
