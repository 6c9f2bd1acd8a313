"""The Airflow side of one Ray task: submit through the owner actor, stream logs, fetch, cancel."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import ray

from airflow_ray_provider import owner as owner_mod
from airflow_ray_provider.serialization import RaySerializationError, dumps_callable, find_unpicklable

if TYPE_CHECKING:
    from airflow_ray_provider.worker import CheckpointJob

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_POLL_S = 1.0  # short, so Airflow's timeout signal and on_kill are handled promptly


class RayTaskFailed(Exception):
    """The callable raised inside Ray; the message carries the remote traceback."""


class RayTaskCancelled(Exception):
    """The Ray task was cancelled (timeout, kill, or its Airflow process stopped polling)."""


class RayObjectLost(Exception):
    """The owner actor no longer knows the key (released, or the actor or cluster restarted)."""


class RayTaskRun:
    """One submitted Ray task, followed from an Airflow task process."""

    def __init__(self, *, key: str, task_label: str, namespace: str, shards: int, lease_s: float,
                 log: Any, shard: int | None = None) -> None:
        self.key = key
        self.task_label = task_label
        self.lease_s = lease_s
        self.log = log
        self.shard = owner_mod.shard_for(key, shards) if shard is None else shard
        self.owner = owner_mod.get_owner(namespace, self.shard)
        self.events: dict[str, Any] = {}
        self.submitted = False
        self.finished = False

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
               options: Mapping[str, Any], job: CheckpointJob | None = None, inputs_digest: str | None = None) -> None:
        """Hand the call to the owner actor; ``job`` gets its fingerprint from the callable and ``inputs_digest``."""
        fn_bytes = dumps_callable(fn, self.task_label)
        parts: tuple[Any, ...] = (fn_bytes, tuple(args), dict(kwargs))
        if job is not None:
            fingerprint = hashlib.sha256(fn_bytes + (inputs_digest or "").encode()).hexdigest()
            parts = (*parts, dataclasses.replace(job, fingerprint=fingerprint))
        try:
            payload = ray.put(parts)
        except Exception as exc:
            raise find_unpicklable(tuple(args), kwargs, self.task_label) from exc
        # The payload ref is owned by this process, which lives until the task ends;
        # wrapping it in a list keeps Ray from resolving it inside the owner actor.
        ray.get(self.owner.submit.remote(self.key, [payload], dict(options), self.lease_s))
        self.submitted = True

    def wait(self) -> dict[str, Any]:
        """Poll until the task ends, writing its output to the Airflow log as it arrives."""
        offset = 0
        started = time.monotonic()
        announced = False
        while True:
            status = ray.get(self.owner.poll.remote(self.key, offset, _POLL_S))
            self.events.update(status["events"])
            if not announced and "node_ip" in self.events:
                announced = True
                self.log.info("Running on Ray node %s (node id %s, worker pid %s)",
                              self.events["node_ip"], self.events.get("node_id"), self.events.get("pid"))
            for line in status["logs"]:
                self.log.info("[ray] %s", _ANSI.sub("", line))
            offset = status["log_offset"]
            if status["state"] != "running":
                self.finished = True
                self.log.info("Ray task %s %s after %.2fs", self.task_label, status["state"],
                              time.monotonic() - started)
                return status

    def result_ref(self) -> ray.ObjectRef:
        try:
            (ref,) = ray.get(self.owner.get.remote(self.key))
        except ray.exceptions.RayTaskError as exc:
            raise RayObjectLost(f"Result of task {self.task_label} is gone from Ray: {exc}") from exc
        return ref

    def fetch(self) -> Any:
        return ray.get(self.result_ref())

    def raise_failure(self, status: Mapping[str, Any]) -> None:
        """Turn a failed or cancelled status into the exception the Airflow task should fail with."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        state = status["state"]
        if state == "unknown":
            raise RayObjectLost(f"The owner actor lost track of task {self.task_label} (key {self.key})")
        if state == "cancelled":
            raise RayTaskCancelled(f"Ray task {self.task_label} was cancelled: {status.get('error') or ''}")
        remote = _ANSI.sub("", status.get("error") or "")
        returned = self.events.get("returned_type")
        if returned is not None:
            raise RaySerializationError(
                f"Task {self.task_label}: its return value of type {returned} cannot be pickled by Ray:\n{remote}"
            )
        cause: BaseException | None = None
        try:
            ray.get(self.result_ref())
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        except Exception as exc:  # noqa: BLE001 - e.g. the exception class cannot be unpickled here
            cause = exc
        if isinstance(cause, (AirflowSkipException, AirflowFailException)):
            raise cause  # keep Airflow's control-flow exceptions raised inside Ray meaningful
        raise RayTaskFailed(f"Ray task {self.task_label} failed:\n{remote}") from cause

    def cancel(self) -> None:
        if self.submitted and not self.finished:
            self.log.warning("Cancelling Ray task %s", self.task_label)
            try:
                ray.get(self.owner.cancel.remote(self.key), timeout=20)
            except Exception as exc:  # noqa: BLE001 - the lease still reaps it
                self.log.warning("Could not cancel Ray task %s: %s", self.task_label, exc)
            self.finished = True

    def release(self) -> None:
        if self.submitted:
            self.owner.release.remote([self.key])
