"""``RayPythonOperator``: a ``PythonOperator`` whose callable runs as a Ray task.

It works on its own (``RayPythonOperator(task_id=..., python_callable=f, num_cpus=2)``)
and is what ``@task.ray`` (:mod:`airflow_ray_provider.decorators.ray`) decorates, as the
standard provider's ``@task`` decorates ``PythonOperator``: templating, ``multiple_outputs``,
``.override()``, ``.partial()/.expand()`` and every operator argument behave as users expect.
Only the call itself moves: the callable is cloudpickled, submitted by the owner actor,
and its output streamed back into the task log.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk.exceptions import TaskDeferred

from airflow_ray_provider.cluster.gateway_api import HeldInput, HeldInputRequest, map_nested
from airflow_ray_provider.exceptions import RayObjectLost
from airflow_ray_provider.hooks.ray import RayHook, check_feasible, dashboard_url
from airflow_ray_provider.hooks.settings import merge_runtime_env
from airflow_ray_provider.links.ray import RAY_LINKS, RayPlace, RayTaskLink
from airflow_ray_provider.operators.durable import STATE_KEY, check_run_record, reattach_window, run_record
from airflow_ray_provider.serialization import is_portable
from airflow_ray_provider.storage import store_conn_id
from airflow_ray_provider.version_compat import ResumableJobMixin
from airflow_ray_provider.xcom.reference import Location, Origin, RayObject, RayObjectDict, RayObjectList

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_ray_provider.cluster.checkpoint import CheckpointJob
    from airflow_ray_provider.hooks.settings import RaySettings
    from airflow_ray_provider.task_run import TaskRun


# The triggers of a triggerer that died are reassigned once its heartbeat is older than
# [triggerer] triggerer_health_check_threshold (30 s by default) and another one picks them up; a deferred
# run waits unpolled for that, with room for a loaded scheduler.
TRIGGERER_FAILOVER_S = 120.0


@dataclass
class _Prepared:
    """One try's call, ready to submit or to compare with what an earlier try submitted."""

    settings: RaySettings
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    fn_bytes: bytes
    fingerprint: str


@dataclass
class _Outcome:
    """The task's return value, and whether the Ray object behind it stays held (an XCom reference)."""

    value: Any
    keep: bool


class RayPythonOperator(ResumableJobMixin, PythonOperator):
    """Runs ``python_callable`` on a Ray cluster and returns its result.

    :param ray_conn_id: the ``ray`` connection (default ``ray_default``; absent means embedded).
    :param num_cpus: CPUs the Ray task reserves (Ray's default: 1).
    :param num_gpus: GPUs the Ray task reserves.
    :param memory: bytes of memory the Ray task reserves.
    :param resources: custom Ray resources, e.g. ``{"node_b": 1}``.
    :param runtime_env: Ray runtime environment, merged over the connection's default (templated).
    :param ray_max_retries: Ray-level retries on worker or node failure (Airflow's ``retries``
        still covers errors raised by the callable).
    :param checkpoint: write the result durably (the Ray worker writes it before the task
        succeeds), restore it when the object store lost it, and reuse it instead of
        recomputing when the task runs again in the same DAG run with the same inputs.
        Inside the callable, ``airflow_ray_provider.cluster.checkpoint.current()`` saves and loads progress.
    :param checkpoint_path: the checkpoint root for this task (default: the ``ray``
        connection's ``checkpoint_path`` extra, else ``$AIRFLOW_HOME/ray-checkpoints``).
    :param checkpoint_conn_id: the Airflow connection with the store's credentials (e.g. ``aws``).
    :param checkpoint_recompute: run the callable even if a matching checkpoint exists.
    :param durable: record the submitted Ray task in the task state store (Airflow 3.3+), so that a
        retry after this try's process died re-attaches to it instead of running the callable again;
        the owner actor then keeps an unpolled run for the time a retry takes to come
        (:func:`~airflow_ray_provider.operators.durable.reattach_window`). ``False``: every try starts over.
    """

    template_fields: Sequence[str] = ("templates_dict", "op_args", "op_kwargs", "runtime_env")
    template_fields_renderers = {"templates_dict": "json", "op_args": "py", "op_kwargs": "py",
                                 "runtime_env": "json"}
    operator_extra_links = RAY_LINKS
    # How the XCom backend tells a Ray task from others without importing this class (no import cycle).
    runs_on_ray = True
    external_id_key = STATE_KEY

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Sequence[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        ray_conn_id: str = RayHook.default_conn_name,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        memory: int | None = None,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        ray_max_retries: int | None = None,
        checkpoint: bool = False,
        checkpoint_path: str | None = None,
        checkpoint_conn_id: str | None = None,
        checkpoint_recompute: bool = False,
        durable: bool = True,
        deferrable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("memory", memory)):
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"@task.ray {name} must be a non-negative number, got {value!r}")
        if resources is not None and not (
            isinstance(resources, Mapping)
            and all(isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in resources.items())
        ):
            raise ValueError(f"@task.ray resources must map names to non-negative numbers, got {resources!r}")
        unwrapped = inspect.unwrap(python_callable)
        if inspect.isgeneratorfunction(unwrapped) or inspect.isasyncgenfunction(unwrapped):
            raise TypeError(
                f"@task.ray {kwargs.get('task_id')!r}: {getattr(python_callable, '__qualname__', python_callable)} "
                f"is a generator function; a task's result is one value, and Ray would keep only the first item. "
                f"Return the items as a list instead")
        self.ray_conn_id = ray_conn_id
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.memory = memory
        # BaseOperator has its own (executor) ``resources``; Ray's are kept apart.
        self.ray_resources = dict(resources or {})
        self.runtime_env = dict(runtime_env or {})
        self.ray_max_retries = ray_max_retries
        for name, value in (("checkpoint_path", checkpoint_path), ("checkpoint_conn_id", checkpoint_conn_id)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"@task.ray {name} must be a non-empty string, got {value!r}")
        self.checkpoint = bool(checkpoint)
        self.checkpoint_path = checkpoint_path
        self.checkpoint_conn_id = checkpoint_conn_id
        self.checkpoint_recompute = bool(checkpoint_recompute)
        self._ray_run: TaskRun | None = None
        self._ray_identity: dict[str, Any] = {}
        self._prepared: _Prepared | None = None
        self._outcome: _Outcome | None = None
        # Where this try's Ray task ran and the dashboard to show it in: what the extra links are built from.
        self.ray_place: RayPlace | None = None
        self.ray_dashboard_url: str | None = None
        if not isinstance(durable, bool):
            raise ValueError(f"@task.ray durable must be True or False, got {durable!r}")
        if deferrable is None:
            from airflow_ray_provider.config import default_deferrable

            deferrable = default_deferrable()
        if not isinstance(deferrable, bool):
            raise ValueError(f"@task.ray deferrable must be True or False, got {deferrable!r}")
        self.deferrable = deferrable
        super().__init__(
            durable=durable,
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )

    def _key_prefix(self) -> str:
        """What every Ray key this task instance submits starts with: its dag, run, task and map index."""
        ident = self._ray_identity
        return "/".join(str(p) for p in (self.dag_id, ident.get("run_id"), self.task_id,
                                         ident.get("map_index", -1))) + "/"

    @property
    def task_label(self) -> str:
        ident = self._ray_identity
        label = f"{self.dag_id}.{self.task_id}"
        if ident.get("map_index", -1) not in (-1, None):
            label += f"[{ident['map_index']}]"
        return label

    def execute(self, context: Context) -> Any:
        self._set_identity(context)
        return super().execute(context)

    def _set_identity(self, context: Context) -> None:
        ti = context["ti"]
        self._ray_identity = {
            "run_id": context.get("run_id"),
            "is_mapped": bool(getattr(ti, "is_mapped", False)),
            "map_index": getattr(ti, "map_index", -1),
            "try_number": getattr(ti, "try_number", 1),
            "context": context,
            "recompute": _recompute_requested(context, self.task_id),
        }

    @staticmethod
    def _materialize(value: Any) -> Any:
        """Airflow hands mapped upstream results as a lazy, DB-backed sequence; Ray needs the items."""
        from airflow.sdk.execution_time.lazy_sequence import LazyXComSequence

        return list(value) if isinstance(value, LazyXComSequence) else value

    def _portable_kwargs(self) -> dict[str, Any]:
        """Drop or refuse context objects (``ti``, ``dag_run``...) that mean nothing inside Ray."""
        context = self._ray_identity.get("context") or {}
        named = set(inspect.signature(self.python_callable).parameters)
        kwargs: dict[str, Any] = {}
        for name, value in self.op_kwargs.items():
            if isinstance(value, (RayObject, RayObjectList, RayObjectDict)):
                kwargs[name] = value  # an upstream result (mapped tasks see it in the context too)
                continue
            from_context = name in context and context[name] is value
            if from_context and name == "params" and hasattr(value, "dump"):
                value = value.dump()
            if from_context and not is_portable(value):
                if name in named:
                    raise TypeError(
                        f"Task {self.task_label}: context value {name!r} ({type(value).__name__}) cannot be "
                        f"used inside a Ray task; pass what you need from it as an argument instead"
                    )
                continue  # only reached through **kwargs: leave it out
            kwargs[name] = self._materialize(value)
        return kwargs

    # -- durable execution (ResumableJobMixin): submit, record, re-attach ---------------------------------
    def execute_callable(self) -> Any:
        context = self._ray_identity.get("context") or {}
        return self._guarded(lambda: self.execute_resumable(context))

    def _guarded(self, body: Callable[[], Any]) -> Any:
        """Run ``body`` (which sets ``self._ray_run``) so that no exit leaves a Ray task running or held for nothing."""
        self._prepared = None
        self._outcome = None
        keep = False
        try:
            result = body()
            keep = self._outcome is not None and self._outcome.keep
            return result
        except TaskDeferred:
            keep = True  # the triggerer watches the Ray task now; execute_complete collects it
            raise
        except BaseException:
            if self._ray_run is not None:
                self._ray_run.cancel()  # timeout, SIGTERM or any local error: leave nothing running in Ray
            raise
        finally:
            if self._ray_run is not None and not keep:
                self._ray_run.release()
            self._ray_run = None

    def _follow(self, key: str, namespace: str, shard: int, lease_s: float) -> TaskRun:
        """The Airflow side of a Ray task an earlier try (or this task before it deferred) submitted."""
        run = self._new_run(key=key, namespace=namespace, shard=shard, lease_s=lease_s)
        run.submitted = True
        return run

    def _new_run(self, *, key: str, namespace: str, lease_s: float, shard: int | None = None,
                 hold_s: float = 0.0) -> TaskRun:
        """A run followed the way the connection reaches the cluster: through its gateway, or as a Ray driver."""
        settings = self._prepare().settings
        common: dict[str, Any] = {"key": key, "task_label": self.task_label, "namespace": namespace,
                                  "shards": settings.owner_shards, "shard": shard, "lease_s": lease_s,
                                  "hold_s": hold_s, "log": self.log}
        if settings.gateway_url is not None:
            from airflow_ray_provider.gateway_client import GatewayTaskRun, client_for

            return GatewayTaskRun(client=client_for(settings), **common)
        from airflow_ray_provider.submission import RayTaskRun

        return RayTaskRun(**common)

    def _prepare(self) -> _Prepared:
        """Connect, check the request fits, and turn the call into what the owner actor submits."""
        from airflow_ray_provider.serialization import dumps_callable
        from airflow_ray_provider.task_run import run_fingerprint

        if self._prepared is not None:
            return self._prepared
        hook = RayHook(self.ray_conn_id)
        settings = hook.settings
        request = {"CPU": 1.0 if self.num_cpus is None else float(self.num_cpus), "GPU": float(self.num_gpus or 0),
                   "memory": float(self.memory or 0), **{k: float(v) for k, v in self.ray_resources.items()}}
        if settings.gateway_url is not None:
            from airflow_ray_provider.gateway_bootstrap import ready_gateway

            client = ready_gateway(settings)  # started on first use; this provider's, on this Python
            if not settings.autoscaling:
                check_feasible(client.status()["node_resources"], request, self.task_label,
                               f"the Ray cluster behind the gateway at {settings.gateway_url}")
        else:
            hook.get_conn()
            hook.check_feasible(request, self.task_label)
        kwargs = self._portable_kwargs()
        args = tuple(self._materialize(a) for a in self.op_args)
        fn_bytes = dumps_callable(self.python_callable, self.task_label)
        # What a re-attaching try compares, and what checkpoint reuse keys on: the callable and its inputs.
        fingerprint = run_fingerprint(fn_bytes, inputs_digest((args, kwargs)))
        self._prepared = _Prepared(settings, args, kwargs, fn_bytes, fingerprint)
        return self._prepared

    def submit_job(self, context: Context) -> dict[str, Any]:
        """Submit the Ray task through the owner actor; return the signed record a later try re-attaches by."""
        prepared = self._prepare()
        settings = prepared.settings
        job = self._checkpoint_job() if self.checkpoint else None
        through_gateway = settings.gateway_url is not None
        inputs: list[HeldInputRequest] = []
        if through_gateway:
            (args, kwargs), inputs = by_key((prepared.args, prepared.kwargs), self.ray_conn_id, settings.namespace,
                                            self.task_label)
        else:
            args, kwargs = by_reference((prepared.args, prepared.kwargs), self.ray_conn_id, settings.namespace,
                                        self.task_label, self.log)
        options: dict[str, Any] = {"name": self.task_label}
        for name, value in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus), ("memory", self.memory),
                            ("max_retries", self.ray_max_retries)):
            if value is not None:
                options[name] = value
        if self.ray_resources:
            options["resources"] = self.ray_resources
        runtime_env = merge_runtime_env(settings.runtime_env, self.runtime_env)
        if not through_gateway:  # (the gateway does the same for the calls it submits)
            from airflow_ray_provider.cluster.shipped import with_shipped_code  # a driver: Ray is imported

            runtime_env = with_shipped_code(runtime_env)
        if runtime_env:
            options["runtime_env"] = runtime_env
        key = f"{self._key_prefix()}{self._ray_identity.get('try_number', 1)}/{uuid.uuid4().hex[:8]}"
        lease_s = self._lease()
        run = self._new_run(key=key, namespace=settings.namespace, lease_s=lease_s, hold_s=self._hold())
        self._ray_run = run
        run.submit(prepared.fn_bytes, args, kwargs, options, job=job, fingerprint=prepared.fingerprint,
                   inputs=inputs)
        if self.durable:
            self.log.info("Submitted Ray task %s (key %s, %s); its lease is %gs, so a retry of this task "
                          "instance can re-attach to it", self.task_label, key, run.owner_label, lease_s)
        return run_record(self._origin(), self.ray_conn_id, settings.namespace, run.shard, key,
                          prepared.fingerprint, int(self._ray_identity.get("try_number", 1)))

    def get_job_status(self, external_id: Any, context: Context) -> str:
        """What became of the Ray task an earlier try recorded: RUNNING, SUCCEEDED or why not to re-attach."""
        record = check_run_record(external_id, self._origin(), self.ray_conn_id)
        if isinstance(record, str):
            self.log.warning("Task %s: not re-attaching: %s; submitting a new Ray task", self.task_label, record)
            return "UNTRUSTED"
        prepared = self._prepare()
        if record.namespace != prepared.settings.namespace:
            self.log.info("Task %s: the connection's namespace changed (%s -> %s); submitting a new Ray task",
                          self.task_label, record.namespace, prepared.settings.namespace)
            return "CHANGED"
        earlier = self._follow(record.key, record.namespace, record.shard, prepared.settings.lease_timeout)
        if record.fingerprint != prepared.fingerprint:
            self.log.info("Task %s: the callable or its inputs changed since try %d submitted Ray task %s; "
                          "submitting a new Ray task", self.task_label, record.try_number, record.key)
            earlier.release()
            return "CHANGED"
        # Take the run over before reading its state: read first, the owner's reaper could cancel it (its
        # lease and hold running out) between "running" here and the re-attach's own set_lease.
        with contextlib.suppress(RayObjectLost):  # no longer held: state() says "unknown"
            earlier.set_lease(self._lease(), self._hold())
        status = earlier.state()
        state = status["state"]
        if state == "running":
            return "RUNNING"
        if state == "finished":
            return "SUCCEEDED"
        if state != "unknown":
            self.log.info("Task %s: Ray task %s that try %d submitted ended %s (%s); submitting a new one",
                          self.task_label, record.key, record.try_number, state, status.get("error") or "")
            earlier.release()
        else:
            self.log.info("Task %s: Ray task %s that try %d submitted is no longer held (released, reaped or "
                          "its owner restarted); submitting a new one", self.task_label, record.key,
                          record.try_number)
        return state.upper()

    def is_job_active(self, status: str) -> bool:
        return status == "RUNNING"

    def is_job_succeeded(self, status: str) -> bool:
        return status == "SUCCEEDED"

    def poll_until_complete(self, external_id: Any, context: Context) -> Any:
        """Wait for the Ray task, streaming its log; on a re-attach also return the result (as the mixin expects).

        Deferrable: hand the wait to the triggerer instead (this raises ``TaskDeferred``).
        """
        reattached = self._ray_run is None
        if reattached:  # a later try re-attaching to a running Ray task
            self._attach(external_id)
        if self.deferrable:
            self._defer()
        self._wait()
        return self.get_job_result(external_id, context) if reattached else None

    def _defer(self) -> None:
        from airflow_ray_provider.triggers.ray import RayRunTrigger, sign_run

        run = self._ray_run
        assert run is not None
        namespace = self._prepare().settings.namespace
        self.log.info("Deferring: the triggerer watches Ray task %s (key %s, %s) and this task resumes to "
                      "collect its result", self.task_label, run.key, run.owner_label)
        self.defer(
            trigger=RayRunTrigger(ray_conn_id=self.ray_conn_id, namespace=namespace, shard=run.shard, key=run.key,
                                  task_label=self.task_label,
                                  signature=sign_run(self.ray_conn_id, namespace, run.shard, run.key)),
            method_name="execute_complete",
            # Resumed with execution_timeout's remainder: the trigger times out, and its cancellation
            # (the task is no longer deferred) cancels the Ray task.
            timeout=self.execution_timeout,
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        """Resumed after the trigger saw the Ray task end: stream its log, then return or fail as ``execute`` would."""
        self._set_identity(context)
        # Raises on a forged or error event, and on one for another task instance's run.
        event = check_event(event, self.ray_conn_id, self.task_label, self._key_prefix())

        def collect() -> Any:
            self._ray_run = self._follow(event["key"], event["namespace"], int(event["shard"]), self._lease())
            self._wait()
            assert self._outcome is not None
            return self._outcome.value

        # PythonOperator.execute would log and return this; TaskFlow pushes it (and splits multiple_outputs).
        return self._guarded(collect)

    def get_job_result(self, external_id: Any, context: Context) -> Any:
        if self._ray_run is None:  # a later try re-attaching to a finished Ray task
            self._attach(external_id)
        if self._outcome is None:
            self._wait()
        assert self._outcome is not None
        return self._outcome.value

    def _attach(self, external_id: Any) -> None:
        record = check_run_record(external_id, self._origin(), self.ray_conn_id)
        assert not isinstance(record, str)  # get_job_status refused it otherwise
        lease_s = self._lease()
        run = self._follow(record.key, record.namespace, record.shard, lease_s)
        self._ray_run = run
        run.set_lease(lease_s, self._hold())
        self.log.info("Re-attached to Ray task %s (key %s, %s), submitted by try %d; not running the callable "
                      "again. Its log so far follows", self.task_label, record.key, run.owner_label,
                      record.try_number)

    def _wait(self) -> None:
        """Wait for the run to end and turn it into the task's return value (``self._outcome``)."""
        run = self._ray_run
        assert run is not None
        status = run.wait(on_start=self._note_place)
        if status["state"] != "finished":
            run.raise_failure(status)
        settings = self._prepare().settings
        if not ray_xcom_backend_active():
            self._outcome = _Outcome(run.fetch(), keep=False)
        elif not self.do_xcom_push:
            self._outcome = _Outcome(None, keep=False)
        else:
            written = run.events.get("checkpoint")
            stored = None if not self.checkpoint or not written else {
                "uri": written["uri"], "sha256": written["sha256"],
                "conn_id": store_conn_id(settings, self.checkpoint_conn_id), "part": None}
            reference = self._reference(run, Location(self.ray_conn_id, settings.namespace, run.shard), stored)
            self._outcome = _Outcome(reference, keep=True)

    def _note_place(self, events: Mapping[str, Any]) -> None:
        """The Ray task started: keep where it runs for the extra links, and log the dashboard's page for it."""
        self.ray_place = RayPlace.from_events(events)
        try:
            self.ray_dashboard_url = dashboard_url(self._prepare().settings)
        except OSError as exc:  # the embedded head's state file: a link is not worth failing the Ray task for
            self.log.warning("No Ray dashboard links for task %s: %s", self.task_label, exc)
            return
        url = RayTaskLink().url_for(self.ray_dashboard_url, self.ray_place)
        if url:
            self.log.info("Ray dashboard: %s (the task's Ray task, node and worker logs links show it too)", url)

    def _hold(self) -> float:
        """For a durable task that may still be retried: the time Airflow takes to notice a dead try and
        start the next one (0 otherwise). The owner waits that long, beyond the lease, for the retry."""
        if not self.durable:
            return 0.0
        return reattach_window(self, int(self._ray_identity.get("try_number", 1)))

    def _lease(self) -> float:
        """How long the owner keeps a run nobody polls: the connection's lease plus the hold (above);
        a deferred run also covers a triggerer handing its triggers to another."""
        return (self._prepare().settings.lease_timeout + self._hold()
                + (TRIGGERER_FAILOVER_S if self.deferrable else 0.0))

    def _origin(self) -> Origin:
        ident = self._ray_identity
        return Origin(self.dag_id, self.task_id, str(ident.get("run_id") or ""), ident.get("map_index", -1))

    def _checkpoint_job(self) -> CheckpointJob:
        from airflow_ray_provider.cluster.checkpoint import CheckpointJob, TaskCheckpoint, TaskKey
        from airflow_ray_provider.storage import store_for

        ident = self._ray_identity
        store, _ = store_for(self.ray_conn_id, self.checkpoint_path, self.checkpoint_conn_id)
        key = TaskKey(self.dag_id, str(ident.get("run_id") or ""), self.task_id, int(ident.get("map_index", -1)))
        mapped_over = not ident.get("is_mapped") and next(self.iter_mapped_dependants(), None) is not None
        split = "dict" if self.multiple_outputs else "auto" if mapped_over else None
        return CheckpointJob(TaskCheckpoint(store, key), fingerprint="",
                             reuse=not (self.checkpoint_recompute or ident.get("recompute")), split=split)

    def _reference(self, run: TaskRun, location: Location,
                   checkpoint: dict[str, Any] | None = None) -> RayObject | RayObjectList | RayObjectDict:
        """The XCom the backend stores: the result stays in Ray; lists and dicts are split when consumed by item."""
        origin = self._origin()
        info = run.describe()
        meta = info["meta"]
        names = run.events.get("names")
        mapped_over = not self._ray_identity.get("is_mapped") and next(self.iter_mapped_dependants(), None)
        if self.multiple_outputs and names is None:
            raise TypeError(f"Task {self.task_label} has multiple_outputs=True, so it must return a dict with "
                            f"string keys; it returned {meta.get('type')}")
        if names is not None and (self.multiple_outputs or mapped_over):
            items = run.split(names)
            return RayObjectDict({n: _item(i, location, origin, n, _part(checkpoint, k))
                                  for k, (n, i) in enumerate(zip(names, items, strict=True))},
                                 location=location, origin=origin, type=meta.get("type", "dict"),
                                 summary=meta.get("summary", ""))
        if mapped_over and meta.get("type") in ("list", "tuple"):
            items = run.split(None)
            return RayObjectList([_item(i, location, origin, str(n), _part(checkpoint, n))
                                  for n, i in enumerate(items)],
                                 location=location, origin=origin, kind=meta["type"], type=meta["type"],
                                 summary=meta.get("summary", ""))
        return _item(info, location, origin, None, checkpoint)

    def on_kill(self) -> None:
        run = self._ray_run
        if run is not None:
            run.cancel()



def check_event(event: Any, conn_id: str, task_label: str, key_prefix: str) -> dict[str, Any]:
    """The trigger's event, if it names a run this deployment deferred on for this task instance.

    It comes back through the DB (``next_kwargs``): the signature says this deployment deferred on the run;
    ``key_prefix`` (the task instance's dag, run, task and map index, which every key it submits starts
    with) binds it to this task instance, as the durable run record is bound.
    """
    from airflow_ray_provider.exceptions import RayConnectionError, SigningError
    from airflow_ray_provider.triggers.ray import verify_run

    if not isinstance(event, dict):
        raise SigningError(f"Task {task_label} resumed with {type(event).__name__} instead of a trigger event")
    if event.get("status") != "done":
        raise RayConnectionError(f"Task {task_label}: the trigger watching its Ray task gave up: "
                                 f"{event.get('message') or event}")
    try:
        signed = verify_run(conn_id, str(event["namespace"]), int(event["shard"]), str(event["key"]),
                            event.get("signature"))
    except (KeyError, TypeError, ValueError):
        signed = False
    if not signed:
        raise SigningError(f"Task {task_label} resumed with an event for Ray key {event.get('key')!r} on "
                           f"connection {conn_id!r} that this deployment did not sign; not reading it")
    if not str(event["key"]).startswith(key_prefix):
        raise SigningError(f"Task {task_label} resumed with an event for Ray key {event['key']!r}, which another "
                           f"task instance submitted (its keys start with {key_prefix!r}); not reading it")
    return event


def _item(info: dict[str, Any], location: Location, origin: Origin, item: str | None,
          checkpoint: dict[str, Any] | None) -> RayObject:
    meta = info.get("meta") or {}
    return RayObject(key=info["key"], location=location, type=meta.get("type", ""), size=info.get("size"),
                     summary=meta.get("summary", ""), nodes=tuple(info.get("node_ids") or ()), origin=origin,
                     item=item, checkpoint=checkpoint)


RECOMPUTE_CONF_KEY = "ray_checkpoint_recompute"


def _recompute_requested(context: Any, task_id: str) -> bool:
    """A DAG run's conf can force recomputation: ``{"ray_checkpoint_recompute": true}`` or a list of task ids."""
    dag_run = context.get("dag_run")
    conf = getattr(dag_run, "conf", None) or {}
    wanted = conf.get(RECOMPUTE_CONF_KEY) if isinstance(conf, Mapping) else None
    if isinstance(wanted, (list, tuple)):
        return task_id in wanted
    return wanted is True


def _part(checkpoint: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
    return None if checkpoint is None else {**checkpoint, "part": index}


def inputs_digest(value: Any) -> str:
    """What identifies a task's inputs for checkpoint reuse; upstream Ray results count by content digest.

    Values that cannot be pickled get a random digest, so their checkpoint is never reused.
    """
    import hashlib

    from airflow_ray_provider.serialization import pickler

    def identity(v: Any) -> Any:
        if isinstance(v, RayObject):
            return ("ray-object", v.checkpoint["sha256"] if v.checkpoint else v.key, v.item)
        if isinstance(v, dict):
            return {k: identity(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(identity(x) for x in v) if type(v) in (list, tuple) else [identity(x) for x in v]
        return v

    try:
        return hashlib.sha256(pickler().dumps(identity(value), protocol=5)).hexdigest()
    except Exception as exc:  # noqa: BLE001 - reported by by_reference/submit with the argument's name
        import logging

        logging.getLogger(__name__).info(
            "Task inputs cannot be pickled for a checkpoint fingerprint (%s: %s); this result will not be "
            "reused on a rerun", type(exc).__name__, exc)
        return uuid.uuid4().hex


def ray_xcom_backend_active() -> bool:
    from airflow.sdk.execution_time.xcom import XCom

    from airflow_ray_provider.xcom.backend import RayXComBackend

    return isinstance(XCom, type) and issubclass(XCom, RayXComBackend)


def _upstream_objects(value: Any, conn_id: str, namespace: str, task_label: str) -> list[RayObject]:
    """The upstream ``RayObject`` references nested anywhere in ``value``; all must live on this connection."""
    found: list[RayObject] = []
    map_nested(value, lambda v: found.append(v) if isinstance(v, RayObject) else None)
    for obj in found:
        if (obj.location.conn_id, obj.location.namespace) != (conn_id, namespace):
            raise ValueError(
                f"Task {task_label} runs on Ray connection {conn_id!r} (namespace {namespace!r}), but its input "
                f"from {obj.origin.label(obj.item)} lives on {obj.location.conn_id!r} "
                f"(namespace {obj.location.namespace!r}); results cannot cross clusters by reference"
            )
    return found


def _input_label(obj: RayObject) -> str:
    return f"task {obj.origin.task_id!r} ({obj.origin.label(obj.item)})"


def by_reference(value: Any, conn_id: str, namespace: str, task_label: str, log: Any) -> Any:
    """Swap upstream ``RayObject`` references (nested anywhere) for refs the Ray worker resolves.

    Upstream objects the cluster lost are put back from their checkpoints first.
    """
    from airflow_ray_provider.cluster.worker import UpstreamRef
    from airflow_ray_provider.xcom.backend import object_refs, worker_checkpoint

    found = _upstream_objects(value, conn_id, namespace, task_label)
    if not found:
        return value
    refs = dict(zip(map(id, found), object_refs(found, restore_log=log), strict=True))
    return map_nested(value, lambda v: UpstreamRef(refs[id(v)], _input_label(v), worker_checkpoint(v))
                      if isinstance(v, RayObject) else v)


def by_key(value: Any, conn_id: str, namespace: str, task_label: str) -> tuple[Any, list[HeldInputRequest]]:
    """For a call through the gateway: each upstream ``RayObject`` becomes a ``HeldInput`` placeholder, and the
    list says which held object each names; the gateway looks them up and the Ray worker swaps them back.

    An upstream object the cluster lost is restored by the worker from its checkpoint (the placeholder carries
    it); one whose owner no longer holds its key is refused by the gateway, naming it.
    """
    from airflow_ray_provider.xcom.backend import worker_checkpoint

    found = _upstream_objects(value, conn_id, namespace, task_label)
    index = {id(obj): i for i, obj in enumerate(found)}
    inputs = [HeldInputRequest(namespace=obj.location.namespace, shard=obj.location.owner, key=obj.key)
              for obj in found]
    return map_nested(value, lambda v: HeldInput(index[id(v)], _input_label(v), worker_checkpoint(v))
                      if isinstance(v, RayObject) else v), inputs
