"""The Airflow side of one Ray task, as a Ray driver: submit through the owner actor, stream logs, fetch, cancel."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray

from airflow_ray_provider.cluster import owner as owner_mod
from airflow_ray_provider.cluster.owner import bounded_get
from airflow_ray_provider.exceptions import (
    RayConnectionError,
    RayObjectLost,
    RayWaitTimeout,
)
from airflow_ray_provider.serialization import find_unpicklable
from airflow_ray_provider.task_run import POLL_S, TaskRun

if TYPE_CHECKING:
    from airflow_ray_provider.cluster.checkpoint import CheckpointJob

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
# A poll waits up to POLL_S inside the owner. Polls are bounded by the run's lease (see
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


class RayTaskRun(TaskRun):
    """One submitted Ray task, followed from an Airflow task process that is a Ray driver."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner = owner_mod.get_owner(self.namespace, self.shard)

    @property
    def poll_timeout(self) -> float:
        """How long one poll may take before the owner counts as wedged: the run's lease.

        The owner cancels a run nobody polled for ``lease_s``. A poll that is still unanswered after
        the lease has either not reached the owner (so the owner has reaped the run already) or
        reached an owner whose event loop is stuck (so its reaper cannot run either); waiting
        longer cannot end well. The floor keeps a tiny lease above the owner's own 1 s wait.
        """
        return max(self.lease_s, POLL_S + _MIN_POLL_MARGIN_S)

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
               fingerprint: str | None = None, inputs: Sequence[Mapping[str, Any]] = ()) -> None:
        if inputs:
            raise ValueError("a Ray driver passes upstream results as UpstreamRef, not by key")
        parts = self.call_parts(fn, args, kwargs, job, inputs_digest, fingerprint)
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
        try:
            return owner_mod.poll_state(self.owner, self.key, timeout=OWNER_CALL_TIMEOUT_S,
                                        what=f"{self.owner_label}: status of Ray task {self.task_label} "
                                             f"(key {self.key})")
        except RayWaitTimeout:
            self.owner_unresponsive = True
            raise

    def set_lease(self, lease_s: float, hold_s: float = 0.0) -> None:
        self.lease_s, self.hold_s = lease_s, hold_s
        if not self._owner_call(self.owner.set_lease.remote(self.key, lease_s, hold_s), "set_lease",
                                OWNER_CALL_TIMEOUT_S):
            raise RayObjectLost(f"{self.owner_label} no longer holds Ray task {self.task_label} (key {self.key})")

    def poll(self, offset: int) -> dict[str, Any]:
        return self._owner_call(self.owner.poll.remote(self.key, offset, POLL_S),
                                f"poll (bounded by the {self.lease_s:g}s lease)", self.poll_timeout)

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

    def remote_cause(self) -> BaseException | None:
        try:
            self.fetch()
        except ray.exceptions.RayTaskError as exc:
            return exc.cause if isinstance(exc.cause, BaseException) else exc
        except Exception as exc:  # noqa: BLE001 - e.g. the exception class cannot be unpickled here
            # Kept as the failure's cause; logged because an Airflow skip/fail raised remotely is lost with it.
            self.log.warning("Could not rebuild the remote exception of Ray task %s (key %s) here: %r",
                             self.task_label, self.key, exc)
            return exc
        return None

    def describe(self) -> dict[str, Any]:
        return self._owner_call(self.owner.describe.remote(self.key), "describe", OWNER_CALL_TIMEOUT_S)

    def split(self, names: Sequence[str] | None) -> list[dict[str, Any]]:
        return self._owner_call(self.owner.split.remote(self.key, None if names is None else list(names)), "split",
                                SPLIT_TIMEOUT_S)

    def send_cancel(self, wait: bool) -> None:
        request = self.owner.cancel.remote(self.key)
        if wait:
            self._owner_call(request, "cancel", CANCEL_TIMEOUT_S)

    def release(self) -> None:
        if self.submitted:
            self.owner.release.remote([self.key])  # not awaited: nothing waits, so nothing can hang here


class DriverOwners:
    """The owner actors, asked as a Ray driver: what ``GatewayClient.inventory`` and ``release`` answer over HTTP
    (``RayHook.owners`` gives one or the other)."""

    def inventory(self, namespace: str, shard: int) -> dict[str, dict[str, Any]]:
        return bounded_get(owner_mod.get_owner(namespace, shard).inventory.remote(), timeout=OWNER_CALL_TIMEOUT_S,
                           what=f"{owner_mod.owner_label(namespace, shard)}: inventory")

    def release(self, keys: Sequence[str], namespace: str, shard: int) -> int:
        # Two owner-call bounds: dropping thousands of refs makes Ray free their objects as it goes.
        return int(bounded_get(owner_mod.get_owner(namespace, shard).release.remote(list(keys)),
                               timeout=2 * OWNER_CALL_TIMEOUT_S,
                               what=f"{owner_mod.owner_label(namespace, shard)}: release of {len(keys)} key(s)"))
