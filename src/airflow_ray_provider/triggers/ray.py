"""``RayRunTrigger``: a deferred ``@task.ray`` waits in the triggerer for its Ray run to end.

The trigger holds no Ray connection: every poll goes through the connection's watcher subprocess
(:mod:`airflow_ray_provider.triggers.watcher`), so the triggerer's event loop never blocks on Ray
and a restarted cluster kills a watcher, not the triggerer. Each poll also renews the run's lease
in the owner actor, which is what keeps the run alive while no task process follows it.

The trigger row is stored in the metadata DB, which is not trusted (the REST API and anyone with DB
access can edit it): its kwargs carry an HMAC over what it would act on, made with the deployment's
``[ray] secret_key`` (:func:`sign_run`), and nothing touches Ray before it is verified.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_ray_provider.cluster import signing

# At import, not per call: an import inside run() would stall the triggerer's event loop (once).
from airflow_ray_provider.config import secret_key
from airflow_ray_provider.triggers import watcher

CLASSPATH = "airflow_ray_provider.triggers.ray.RayRunTrigger"
# Past this long without an answer from the cluster the task fails, naming it: the owner has
# reaped the run by then anyway unless its lease is longer, and a human should look.
UNREACHABLE_LIMIT_S = 600.0
# The triggerer's cancel message for a user action (mark failed / success, clear); on Airflow 3.3
# the triggerer then calls on_kill() itself (airflow/jobs/triggerer_job_runner.py, run_trigger).
USER_ACTION_CANCEL_MSG = "__airflow_user_action__"
# Asking the API server for the task instance's state, from the triggerer. Inside on_kill, which Airflow bounds
# by [triggerer] on_kill_timeout (30 s), leaving time for the cancel itself. 10 s ran out on the loaded 2-core
# test machine for a triggerer started seconds before, which left the run to its lease (180 s).
TASK_STATE_TIMEOUT_S = 20.0
# The triggerer answers a trigger's Task SDK calls through an execution API it builds in its own process on the
# first such call (airflow/jobs/triggerer_job_runner.py, in_process_api_server): 10 s of a loaded 2-core
# machine, during which its supervisor answers nothing. A freshly started triggerer would spend that inside
# the first on_kill's TASK_STATE_TIMEOUT_S, so the first trigger run in a triggerer process reads its task's
# state once at start (discarding it), and a user action later finds the API built.
STATE_API_READY = "Task state API of this triggerer ready"
_state_api_warm: asyncio.Task[None] | None = None
MIN_POLL_INTERVAL_S = 0.1
MAX_POLL_INTERVAL_S = 60.0
DEFERRED = "deferred"


def _payload(conn_id: str, namespace: str, shard: int, key: str) -> dict[str, Any]:
    return {"conn_id": conn_id, "namespace": namespace, "shard": int(shard), "key": key}


def sign_run(conn_id: str, namespace: str, shard: int, key: str) -> str:
    """The signature a :class:`RayRunTrigger` for this run must carry (the operator makes it before deferring)."""
    return signing.sign(secret_key(), signing.TRIGGER, _payload(conn_id, namespace, shard, key))


def verify_run(conn_id: str, namespace: str, shard: int, key: str, signature: Any) -> bool:
    """Whether ``signature`` is this deployment's for the run; also for the event the task resumes with."""
    try:
        return signing.verify(secret_key(), signing.TRIGGER, _payload(conn_id, namespace, shard, key), signature)
    except (TypeError, ValueError):  # e.g. a shard that is not a number: never signed by us
        return False


class RayRunTrigger(BaseTrigger):
    """Wait for one Ray run held by the owner actor ``shard`` of ``namespace``; fire once when it ends.

    Events (one per trigger run):

    * ``{"status": "done", "state": "finished"|"failed"|"cancelled"|"unknown", "key", "shard",
      "namespace", "ray_conn_id", "signature", "error"}`` when the run is no longer running;
    * ``{"status": "error", "message"}`` when the signature is not this deployment's (nothing in Ray
      was touched) or the cluster did not answer for :data:`UNREACHABLE_LIMIT_S`.
    """

    def __init__(self, *, ray_conn_id: str, namespace: str, shard: int, key: str, task_label: str,
                 poll_interval: float = 2.0, signature: str = "") -> None:
        super().__init__()
        self.ray_conn_id = ray_conn_id
        self.namespace = namespace
        self.shard = shard
        self.key = key
        self.task_label = task_label
        self.poll_interval = poll_interval
        self.signature = signature
        self._cancel_decided = False  # on_kill and run()'s CancelledError both may decide: once is enough

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {
            "ray_conn_id": self.ray_conn_id, "namespace": self.namespace, "shard": self.shard, "key": self.key,
            "task_label": self.task_label, "poll_interval": self.poll_interval, "signature": self.signature,
        }

    def _signed(self) -> bool:
        return verify_run(self.ray_conn_id, self.namespace, self.shard, self.key, self.signature)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        if not self._signed():
            yield TriggerEvent({"status": "error", "message": (
                f"Refusing to watch Ray run {self.key!r} of task {self.task_label} (connection "
                f"{self.ray_conn_id!r}): the trigger row is not signed by this deployment ([ray] secret_key); "
                f"it was altered, or made by a deployment with another secret")})
            return
        self._warm_state_api()
        client = await self._watch()
        unreachable_since: float | None = None
        # poll_interval is not signed (it decides nothing in Ray), so it is clamped: below 0.1 s it would
        # flood the owner actor, above MAX_POLL_INTERVAL_S it would let the run's lease lapse.
        interval = min(MAX_POLL_INTERVAL_S, max(MIN_POLL_INTERVAL_S, float(self.poll_interval)))
        try:
            while True:
                problem: str | None = None
                asked = time.monotonic()  # a failing poll itself can take REQUEST_TIMEOUT_S: count from its start
                try:
                    answer = await client.poll(self.namespace, int(self.shard), self.key)
                except watcher.WatcherUnavailable as exc:
                    problem = str(exc)
                else:
                    problem = answer.get("fault")
                    if problem is None:
                        unreachable_since = None
                        state = answer.get("state")
                        if state != "running":
                            yield TriggerEvent({
                                "status": "done", "state": state, "key": self.key, "shard": self.shard,
                                "namespace": self.namespace, "ray_conn_id": self.ray_conn_id,
                                "signature": self.signature, "error": answer.get("error"),
                            })
                            return
                if problem is not None:
                    unreachable_since = unreachable_since or asked
                    waited = time.monotonic() - unreachable_since
                    self.log.warning("Cannot reach the Ray cluster of connection %r for run %s (key %s) for %.0fs: "
                                     "%s", self.ray_conn_id, self.task_label, self.key, waited, problem)
                    if waited > UNREACHABLE_LIMIT_S:
                        yield TriggerEvent({"status": "error", "message": (
                            f"The Ray cluster of connection {self.ray_conn_id!r} did not answer for "
                            f"{waited:.0f}s about Ray run {self.key!r} of task {self.task_label} "
                            f"(limit {UNREACHABLE_LIMIT_S:.0f}s): {problem}")})
                        return
                await asyncio.sleep(interval)
        except asyncio.CancelledError as exc:
            # A user action comes with the triggerer's message, and Airflow 3.3 then calls on_kill(),
            # which decides; except when the trigger has timed out: the triggerer skips on_kill then
            # (run_trigger checks timeout_after first). Anything else is a triggerer shutting down or a
            # trigger moved elsewhere: decide here too, by the task's state.
            if not (exc.args and exc.args[0] == USER_ACTION_CANCEL_MSG) or self._timed_out():
                await self._cancel_run_if_abandoned("the trigger was cancelled")
            raise

    async def _watch(self) -> Any:
        """Who answers this trigger's polls: the connection's gateway, else its watcher subprocess (a Ray driver)."""
        from airflow_ray_provider.hooks.ray import RayHook
        from airflow_ray_provider.hooks.settings import RaySettings

        try:  # the async read: the triggerer's supervisor answers it without blocking the loop
            conn = await RayHook.aget_connection(self.ray_conn_id)
            settings = RaySettings.from_fields(host=conn.host, port=conn.port, password=conn.password,
                                               extra=conn.extra_dejson)
        except Exception as exc:  # noqa: BLE001 - the watcher reads the connection again and reports it
            self.log.warning("Could not read connection %r here (%s); asking its watcher", self.ray_conn_id, exc)
            return watcher.get_client(self.ray_conn_id)
        if settings.gateway_url is None:
            return watcher.get_client(self.ray_conn_id)
        from airflow_ray_provider.gateway_client import GatewayWatch, client_for

        return GatewayWatch(client_for(settings))

    def _warm_state_api(self) -> None:
        """Start the one read per triggerer process that builds its execution API (see STATE_API_READY)."""
        global _state_api_warm
        if _state_api_warm is not None or self.task_instance is None:
            return

        async def warm() -> None:
            started = time.monotonic()
            try:
                await self.safe_to_cancel()
            except Exception as exc:  # noqa: BLE001 - a warm-up only: on_kill reads (and reports) again
                self.log.info("Could not read the task's state ahead of time (%s: %s)", type(exc).__name__, exc)
                return
            self.log.info("%s (%.1fs)", STATE_API_READY, time.monotonic() - started)

        # Held in a module global: the loop keeps only a weak reference to a task.
        _state_api_warm = asyncio.get_running_loop().create_task(warm(), name="ray-trigger-state-api-warm-up")

    def _timed_out(self) -> bool:
        """Whether the triggerer's ``timeout_after`` for this trigger has passed (set when it runs one)."""
        timeout_after = getattr(self, "timeout_after", None)
        if not isinstance(timeout_after, datetime.datetime):
            return False
        if timeout_after.tzinfo is None:
            timeout_after = timeout_after.replace(tzinfo=datetime.timezone.utc)
        return timeout_after < datetime.datetime.now(datetime.timezone.utc)

    async def on_kill(self) -> None:
        """Airflow 3.3 calls this when the trigger is cancelled for a user action on the task.

        The same message is also used when this triggerer loses the trigger to another one (its
        heartbeat lapsed), with the task still deferred: so the task's state decides here too.
        """
        await self._cancel_run_if_abandoned("the task was acted on (on_kill)")

    async def safe_to_cancel(self) -> bool:
        """Whether nothing will resume the task: its instance is no longer deferred (or is gone).

        Asks the API server through the triggerer's supervisor
        (``RuntimeTaskInstance.get_task_states``, the Task SDK call providers use for this; it is
        synchronous, so it runs in a thread). When the state cannot be read the run is kept: its
        lease reaps it if nothing resumes it, while a wrong cancel would lose a run the task still wants.
        """
        ti = self.task_instance
        if ti is None:
            return False
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        map_index = getattr(ti, "map_index", -1)
        map_index = -1 if map_index is None else map_index
        states = await asyncio.wait_for(asyncio.to_thread(
            RuntimeTaskInstance.get_task_states, dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id],
            map_index=map_index), TASK_STATE_TIMEOUT_S)
        # The API names mapped instances "<task_id>_<map_index>" (execution_api routes/task_instances.py).
        name = ti.task_id if map_index < 0 else f"{ti.task_id}_{map_index}"
        by_task = (states or {}).get(ti.run_id) or {}
        if name not in by_task:
            return True  # the task instance (or its dag run) was deleted: nothing will resume
        state = by_task[name]
        return str(getattr(state, "value", state)) != DEFERRED

    async def _cancel_run_if_abandoned(self, why: str) -> None:
        if self._cancel_decided or not self._signed():
            return
        self._cancel_decided = True
        try:
            cancel = await self.safe_to_cancel()
        except Exception as exc:  # noqa: BLE001 - keeping the run is the safe default
            self.log.warning("Keeping Ray run %s (key %s): could not read the task's state (%s: %s); its lease "
                             "reaps it if nothing resumes it", self.task_label, self.key, type(exc).__name__, exc)
            return
        if not cancel:
            self.log.info("Keeping Ray run %s (key %s) after %s: the task is still deferred (the triggerer is "
                          "stopping or the trigger moved; the next triggerer watches it) or this trigger does not "
                          "know its task instance (the lease reaps the run if nothing resumes it)",
                          self.task_label, self.key, why)
            return
        self.log.warning("Cancelling Ray run %s (key %s): %s and the task is no longer deferred",
                         self.task_label, self.key, why)
        try:
            answer = await (await self._watch()).cancel(self.namespace, int(self.shard), self.key)
        except watcher.WatcherUnavailable as exc:
            self.log.warning("Could not cancel Ray run %s (key %s): %s; its lease reaps it", self.task_label,
                             self.key, exc)
            return
        if answer.get("fault"):
            self.log.warning("Could not cancel Ray run %s (key %s): %s; its lease reaps it", self.task_label,
                             self.key, answer["fault"])
