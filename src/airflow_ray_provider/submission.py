"""The Airflow side of one Ray task: submit through the owner actor, stream logs, fetch, cancel."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import ray

from airflow_ray_provider.cluster import owner as owner_mod
from airflow_ray_provider.cluster.owner import bounded_get
from airflow_ray_provider.exceptions import (
    RayConnectionError,
    RayObjectLost,
    RaySerializationError,
    RayTaskCancelled,
    RayTaskFailed,
    RayWaitTimeout,
)
from airflow_ray_provider.serialization import dumps_callable, find_unpicklable

if TYPE_CHECKING:
    from airflow_ray_provider.cluster.worker import CheckpointJob

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_POLL_S = 1.0  # short, so Airflow's timeout signal and on_kill are handled promptly

log = logging.getLogger(__name__)

# Bounds on every wait of the Airflow process (read at call time, so tests and operators can lower them).
# The owner actor answers submit/get/describe/inventory/release from memory in milliseconds; a minute
# also covers it being restarted by Ray (max_restarts=-1) on a loaded head. Past that it is wedged.
OWNER_CALL_TIMEOUT_S = 60.0
# split runs a Ray task that unpickles the whole result and stores each item: minutes for GBs.
SPLIT_TIMEOUT_S = 600.0
# Pulling a result's bytes into this process (only without the Ray XCom backend, so the value goes
# into the metadata DB and cannot be huge; also the small remote exception of a failed task).
FETCH_TIMEOUT_S = 900.0
# cancel waits up to 10 s inside the owner for the Ray task to end (TaskOwner.cancel), plus the round trip.
CANCEL_TIMEOUT_S = 20.0
# A poll waits up to _POLL_S inside the owner. Polls are bounded by the run's lease (see
# RayTaskRun.poll_timeout), but never tighter than this margin above the server-side wait.
_MIN_POLL_MARGIN_S = 4.0


def missing_provider(where: str) -> RayConnectionError:
    """The cluster's Python cannot import the provider: shipping is off and the nodes lack it."""
    from airflow_ray_provider import __version__
    from airflow_ray_provider.config import ship_cluster_code

    why = ("[ray] ship_cluster_code is False" if not ship_cluster_code()
           else "the shipped code did not reach that node")
    return RayConnectionError(
        f"{where} could not start: the Ray cluster cannot import airflow_ray_provider ({why}, and the node has "
        f"no copy installed). Set [ray] ship_cluster_code = True (the default: the provider ships its "
        f"cluster-side code with each connection), or install airflow-ray-provider=={__version__} on every node")


def run_fingerprint(fn_bytes: bytes, inputs_digest: str) -> str:
    """What identifies one call: the pickled callable and its inputs (checkpoint reuse, durable re-attach)."""
    return hashlib.sha256(fn_bytes + inputs_digest.encode()).hexdigest()


class RayTaskRun:
    """One submitted Ray task, followed from an Airflow task process."""

    def __init__(self, *, key: str, task_label: str, namespace: str, shards: int, lease_s: float,
                 log: Any, shard: int | None = None, hold_s: float = 0.0) -> None:
        self.key = key
        self.task_label = task_label
        self.lease_s = lease_s
        self.hold_s = hold_s  # a durable run: how long its result is kept for a retry (TaskOwner.submit)
        self.log = log
        self.shard = owner_mod.shard_for(key, shards) if shard is None else shard
        self.owner_label = owner_mod.owner_label(namespace, self.shard)
        self.owner = owner_mod.get_owner(namespace, self.shard)
        self.events: dict[str, Any] = {}
        self.submitted = False
        self.finished = False
        self.owner_unresponsive = False  # a bounded wait on the owner timed out: do not wait on it again

    @property
    def poll_timeout(self) -> float:
        """How long one poll may take before the owner counts as wedged: the run's lease.

        The owner cancels a run nobody polled for ``lease_s``. A poll that is still unanswered after
        the lease has either not reached the owner (so the owner has reaped the run already) or
        reached an owner whose event loop is stuck (so its reaper cannot run either); waiting
        longer cannot end well. The floor keeps a tiny lease above the owner's own 1 s wait.
        """
        return max(self.lease_s, _POLL_S + _MIN_POLL_MARGIN_S)

    def _owner_call(self, ref: Any, method: str, timeout: float) -> Any:
        """Wait for one owner call, naming the owner, the method, the task and the key on timeout."""
        try:
            return bounded_get(ref, timeout=timeout,
                               what=f"{self.owner_label}: {method} of Ray task {self.task_label} (key {self.key})")
        except RayWaitTimeout:
            self.owner_unresponsive = True
            raise
        except ray.exceptions.RayActorError as exc:
            if "No module named 'airflow_ray_provider" in str(exc):
                raise missing_provider(self.owner_label) from exc
            raise

    def submit(self, fn: Callable[..., Any] | bytes, args: tuple[Any, ...], kwargs: Mapping[str, Any],
               options: Mapping[str, Any], job: CheckpointJob | None = None, inputs_digest: str | None = None,
               fingerprint: str | None = None) -> None:
        """Hand the call to the owner actor.

        ``fn`` is the callable or its bytes from :func:`dumps_callable`. ``job`` gets ``fingerprint``,
        or one made from the callable and ``inputs_digest``.
        """
        fn_bytes = fn if isinstance(fn, bytes) else dumps_callable(fn, self.task_label)
        parts: tuple[Any, ...] = (fn_bytes, tuple(args), dict(kwargs))
        if job is not None:
            fingerprint = fingerprint or run_fingerprint(fn_bytes, inputs_digest or "")
            parts = (*parts, dataclasses.replace(job, fingerprint=fingerprint))
        try:
            payload = ray.put(parts)
        except Exception as exc:
            raise find_unpicklable(tuple(args), kwargs, self.task_label) from exc
        # The payload ref is owned by this process, which lives until the task ends;
        # wrapping it in a list keeps Ray from resolving it inside the owner actor.
        call = self.owner.submit.remote(self.key, [payload], dict(options), self.lease_s, self.hold_s)
        try:
            self._owner_call(call, "submit", OWNER_CALL_TIMEOUT_S)
        except RayWaitTimeout:
            self.submitted = True  # it may have started: cancel() and release() must still reach the owner
            raise
        self.submitted = True

    def state(self) -> dict[str, Any]:
        """The run's state now (no log lines): what a later try decides on before it re-attaches."""
        try:
            return owner_mod.poll_state(self.owner, self.key, timeout=OWNER_CALL_TIMEOUT_S,
                                        what=f"{self.owner_label}: status of Ray task {self.task_label} "
                                             f"(key {self.key})")
        except RayWaitTimeout:
            self.owner_unresponsive = True
            raise

    def set_lease(self, lease_s: float, hold_s: float = 0.0) -> None:
        """This process re-attached to the run: the owner keeps it for this try's lease from now on."""
        self.lease_s, self.hold_s = lease_s, hold_s
        if not self._owner_call(self.owner.set_lease.remote(self.key, lease_s, hold_s), "set_lease",
                                OWNER_CALL_TIMEOUT_S):
            raise RayObjectLost(f"{self.owner_label} no longer holds Ray task {self.task_label} (key {self.key})")

    def wait(self, on_start: Callable[[Mapping[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the task ends, writing its output to the Airflow log as it arrives.

        ``on_start`` is called once with the run's events when the Ray worker has said where it runs.
        """
        offset = 0
        started = time.monotonic()
        announced = False
        while True:
            status = self._owner_call(self.owner.poll.remote(self.key, offset, _POLL_S),
                                      f"poll (bounded by the {self.lease_s:g}s lease)", self.poll_timeout)
            self.events.update(status["events"])
            if not announced and "node_ip" in self.events:
                announced = True
                self.log.info("Running on Ray node %s (node id %s, worker pid %s)",
                              self.events["node_ip"], self.events.get("node_id"), self.events.get("pid"))
                if on_start is not None:
                    on_start(self.events)
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
            (ref,) = self._owner_call(self.owner.get.remote(self.key), "get", OWNER_CALL_TIMEOUT_S)
        except ray.exceptions.RayTaskError as exc:
            raise RayObjectLost(f"Result of task {self.task_label} is gone from Ray: {exc}") from exc
        return ref

    def fetch(self) -> Any:
        return bounded_get(self.result_ref(), timeout=FETCH_TIMEOUT_S,
                           what=f"the result of Ray task {self.task_label} (key {self.key}, "
                                f"held by {self.owner_label})")

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
            self.fetch()
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        except Exception as exc:  # noqa: BLE001 - e.g. the exception class cannot be unpickled here
            # Kept as the failure's cause; logged because an Airflow skip/fail raised remotely is lost with it.
            self.log.warning("Could not rebuild the remote exception of Ray task %s (key %s) here: %r",
                             self.task_label, self.key, exc)
            cause = exc
        if isinstance(cause, (AirflowSkipException, AirflowFailException)):
            raise cause  # keep Airflow's control-flow exceptions raised inside Ray meaningful
        raise RayTaskFailed(f"Ray task {self.task_label} failed:\n{remote}") from cause

    def cancel(self) -> None:
        if self.submitted and not self.finished:
            self.log.warning("Cancelling Ray task %s", self.task_label)
            if self.owner_unresponsive:
                # Waiting on a wedged owner again would only delay the failure. The request is queued,
                # so an owner that recovers still cancels; failing that, the lease reaps the run.
                self.owner.cancel.remote(self.key)
                self.log.warning("Not waiting for %s to cancel Ray task %s (key %s): it stopped answering; "
                                 "the cancel request is queued and the %gs lease reaps the run anyway",
                                 self.owner_label, self.task_label, self.key, self.lease_s)
            else:
                try:
                    self._owner_call(self.owner.cancel.remote(self.key), "cancel", CANCEL_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - the lease still reaps it
                    self.log.warning("Could not cancel Ray task %s (key %s) through %s: %s",
                                     self.task_label, self.key, self.owner_label, exc)
            self.finished = True

    def release(self) -> None:
        if self.submitted:
            self.owner.release.remote([self.key])  # not awaited: nothing waits, so nothing can hang here
