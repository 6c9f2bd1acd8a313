"""One submitted Ray task, followed from an Airflow task process, whichever way the process reaches the cluster.

``TaskRun`` holds what does not depend on that: the run's identity, following its log into the task log, turning a
failed run into the Airflow task's exception, and cancelling it on the way out. A subclass talks to the run's owner
actor: ``submission.RayTaskRun`` as a Ray driver, ``gateway_client.GatewayTaskRun`` over the gateway's HTTP API.
Imports neither Ray nor (at import time) Airflow.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from airflow_ray_provider.cluster.naming import owner_label, shard_for
from airflow_ray_provider.exceptions import RayObjectLost, RaySerializationError, RayTaskCancelled, RayTaskFailed

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# One poll waits this long inside the owner for news: short, so Airflow's timeout signal and on_kill are handled
# promptly between polls.
POLL_S = 1.0


def run_fingerprint(fn_bytes: bytes, inputs_digest: str) -> str:
    """What identifies one call: the pickled callable and its inputs (checkpoint reuse, durable re-attach)."""
    return hashlib.sha256(fn_bytes + inputs_digest.encode()).hexdigest()


class TaskRun(abc.ABC):
    """One submitted Ray task: ``submit``, ``wait`` (streaming its log), then ``fetch``/``describe``/``split`` its
    result or ``raise_failure``; ``cancel`` and ``release`` on every way out."""

    def __init__(self, *, key: str, task_label: str, namespace: str, shards: int, lease_s: float,
                 log: Any, shard: int | None = None, hold_s: float = 0.0) -> None:
        self.key = key
        self.task_label = task_label
        self.namespace = namespace
        self.lease_s = lease_s
        self.hold_s = hold_s  # a durable run: how long its result is kept for a retry (TaskOwner.submit)
        self.log = log
        self.shard = shard_for(key, shards) if shard is None else shard
        self.owner_label = owner_label(namespace, self.shard)
        self.events: dict[str, Any] = {}
        self.submitted = False
        self.finished = False
        self.owner_unresponsive = False  # a bounded wait on the owner timed out: do not wait on it again

    # -- what a way into the cluster provides ------------------------------------------------------------
    @abc.abstractmethod
    def submit(self, fn: Callable[..., Any] | bytes, args: tuple[Any, ...], kwargs: Mapping[str, Any],
               options: Mapping[str, Any], job: Any = None, inputs_digest: str | None = None,
               fingerprint: str | None = None, inputs: Sequence[Mapping[str, Any]] = ()) -> None:
        """Hand the call to the owner actor. ``fn``: the callable or its bytes (``dumps_callable``); ``job``: a
        ``CheckpointJob``, given ``fingerprint`` or one made from the callable and ``inputs_digest``; ``inputs``:
        the upstream results a gateway call names by key (``gateway_api.HeldInputRequest``)."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """The run's state now (no log lines): what a later try decides on before it re-attaches."""

    @abc.abstractmethod
    def set_lease(self, lease_s: float, hold_s: float = 0.0) -> None:
        """This process re-attached to the run: the owner keeps it for this try's lease from now on
        (``RayObjectLost`` if the owner no longer holds it)."""

    @abc.abstractmethod
    def poll(self, offset: int) -> dict[str, Any]:
        """State, log lines from ``offset`` and events, waiting up to ``POLL_S`` for news."""

    @abc.abstractmethod
    def fetch(self) -> Any:
        """The result's value, in this process."""

    @abc.abstractmethod
    def remote_cause(self) -> BaseException | None:
        """The exception the callable raised, rebuilt here where that is possible (else ``None``)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The finished result's key, size, nodes and summary (``TaskOwner.describe``)."""

    @abc.abstractmethod
    def split(self, names: Sequence[str] | None) -> list[dict[str, Any]]:
        """Store a list or dict result as one object per item, each described (``TaskOwner.split``)."""

    @abc.abstractmethod
    def send_cancel(self, wait: bool) -> None:
        """Ask the owner to cancel the run; ``wait``: for its answer (bounded), else only send the request."""

    @abc.abstractmethod
    def release(self) -> None:
        """Let the owner drop the run and its result, without waiting for an answer."""

    # -- shared ------------------------------------------------------------------------------------------
    def call_parts(self, fn: Callable[..., Any] | bytes, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                   job: Any = None, inputs_digest: str | None = None,
                   fingerprint: str | None = None) -> tuple[Any, ...]:
        """What the Ray worker runs: ``(callable bytes, args, kwargs[, job])``, the job given its fingerprint."""
        from airflow_ray_provider.serialization import dumps_callable

        fn_bytes = fn if isinstance(fn, bytes) else dumps_callable(fn, self.task_label)
        parts: tuple[Any, ...] = (fn_bytes, tuple(args), dict(kwargs))
        if job is not None:
            fingerprint = fingerprint or run_fingerprint(fn_bytes, inputs_digest or "")
            parts = (*parts, dataclasses.replace(job, fingerprint=fingerprint))
        return parts

    def wait(self, on_start: Callable[[Mapping[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the task ends, writing its output to the Airflow log as it arrives.

        ``on_start`` is called once with the run's events when the Ray worker has said where it runs.
        """
        offset = 0
        started = time.monotonic()
        announced = False
        while True:
            status = self.poll(offset)
            self.events.update(status["events"])
            if not announced and "node_ip" in self.events:
                announced = True
                self.log.info("Running on Ray node %s (node id %s, worker pid %s)",
                              self.events["node_ip"], self.events.get("node_id"), self.events.get("pid"))
                if on_start is not None:
                    on_start(self.events)
            for line in status["logs"]:
                self.log.info("[ray] %s", ANSI.sub("", line))
            offset = status["log_offset"]
            if status["state"] != "running":
                self.finished = True
                self.log.info("Ray task %s %s after %.2fs", self.task_label, status["state"],
                              time.monotonic() - started)
                return status

    def raise_failure(self, status: Mapping[str, Any]) -> None:
        """Turn a failed or cancelled status into the exception the Airflow task should fail with."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        state = status["state"]
        if state == "unknown":
            raise RayObjectLost(f"The owner actor lost track of task {self.task_label} (key {self.key})")
        if state == "cancelled":
            raise RayTaskCancelled(f"Ray task {self.task_label} was cancelled: {status.get('error') or ''}")
        remote = ANSI.sub("", status.get("error") or "")
        returned = self.events.get("returned_type")
        if returned is not None:
            raise RaySerializationError(
                f"Task {self.task_label}: its return value of type {returned} cannot be pickled by Ray:\n{remote}"
            )
        cause = self.remote_cause()
        if isinstance(cause, (AirflowSkipException, AirflowFailException)):
            raise cause  # keep Airflow's control-flow exceptions raised inside Ray meaningful
        raise RayTaskFailed(f"Ray task {self.task_label} failed:\n{remote}") from cause

    def cancel(self) -> None:
        if self.submitted and not self.finished:
            self.log.warning("Cancelling Ray task %s", self.task_label)
            if self.owner_unresponsive:
                # Waiting on a wedged owner again would only delay the failure. The request is queued,
                # so an owner that recovers still cancels; failing that, the lease reaps the run.
                self.send_cancel(wait=False)
                self.log.warning("Not waiting for %s to cancel Ray task %s (key %s): it stopped answering; "
                                 "the cancel request is queued and the %gs lease reaps the run anyway",
                                 self.owner_label, self.task_label, self.key, self.lease_s)
            else:
                try:
                    self.send_cancel(wait=True)
                except Exception as exc:  # noqa: BLE001 - the lease still reaps it
                    self.log.warning("Could not cancel Ray task %s (key %s) through %s: %s",
                                     self.task_label, self.key, self.owner_label, exc)
            self.finished = True
