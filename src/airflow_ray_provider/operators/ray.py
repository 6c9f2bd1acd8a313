"""``RayPythonOperator``: a ``PythonOperator`` whose callable runs as a Ray task.

It works on its own (``RayPythonOperator(task_id=..., python_callable=f, num_cpus=2)``)
and is what ``@task.ray`` (:mod:`airflow_ray_provider.decorators.ray`) decorates, as the
standard provider's ``@task`` decorates ``PythonOperator``: templating, ``multiple_outputs``,
``.override()``, ``.partial()/.expand()`` and every operator argument behave as users expect.
Only the call itself moves: the callable is cloudpickled, submitted by the owner actor,
and its output streamed back into the task log.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.python import PythonOperator

from airflow_ray_provider.bundle import with_shipped_code
from airflow_ray_provider.hooks.ray import RayHook
from airflow_ray_provider.hooks.settings import merge_runtime_env
from airflow_ray_provider.serialization import is_portable
from airflow_ray_provider.xcom.reference import Location, Origin, RayObject, RayObjectDict, RayObjectList

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_ray_provider.cluster.worker import CheckpointJob
    from airflow_ray_provider.submission import RayTaskRun


class RayPythonOperator(PythonOperator):
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
    """

    template_fields: Sequence[str] = ("templates_dict", "op_args", "op_kwargs", "runtime_env")
    template_fields_renderers = {"templates_dict": "json", "op_args": "py", "op_kwargs": "py",
                                 "runtime_env": "json"}
    # How the XCom backend tells a Ray task from others without importing this class (no import cycle).
    runs_on_ray = True

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
        self._ray_run: RayTaskRun | None = None
        self._ray_identity: dict[str, Any] = {}
        self._store_conn_id: str | None = None
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )

    @property
    def task_label(self) -> str:
        ident = self._ray_identity
        label = f"{self.dag_id}.{self.task_id}"
        if ident.get("map_index", -1) not in (-1, None):
            label += f"[{ident['map_index']}]"
        return label

    def execute(self, context: Context) -> Any:
        ti = context["ti"]
        self._ray_identity = {
            "run_id": context.get("run_id"),
            "is_mapped": bool(getattr(ti, "is_mapped", False)),
            "map_index": getattr(ti, "map_index", -1),
            "try_number": getattr(ti, "try_number", 1),
            "context": context,
            "recompute": _recompute_requested(context, self.task_id),
        }
        return super().execute(context)

    @staticmethod
    def _materialize(value: Any) -> Any:
        """Airflow hands mapped upstream results as a lazy, DB-backed sequence; Ray needs the items."""
        from airflow.sdk.execution_time.lazy_sequence import LazyXComSequence

        return list(value) if isinstance(value, LazyXComSequence) else value

    def _portable_kwargs(self) -> dict[str, Any]:
        """Drop or refuse context objects (``ti``, ``dag_run``...) that mean nothing inside Ray."""
        import inspect

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

    def execute_callable(self) -> Any:
        from airflow_ray_provider.submission import RayTaskRun

        hook = RayHook(self.ray_conn_id)
        settings = hook.settings
        hook.get_conn()
        hook.check_feasible(
            {"CPU": 1.0 if self.num_cpus is None else float(self.num_cpus), "GPU": float(self.num_gpus or 0),
             "memory": float(self.memory or 0), **{k: float(v) for k, v in self.ray_resources.items()}},
            self.task_label,
        )
        kwargs = self._portable_kwargs()
        args = tuple(self._materialize(a) for a in self.op_args)
        job = self._checkpoint_job() if self.checkpoint else None
        inputs = inputs_digest((args, kwargs)) if job is not None else None
        args, kwargs = by_reference((args, kwargs), self.ray_conn_id, settings.namespace, self.task_label, self.log)
        options: dict[str, Any] = {"name": self.task_label}
        for name, value in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus), ("memory", self.memory),
                            ("max_retries", self.ray_max_retries)):
            if value is not None:
                options[name] = value
        if self.ray_resources:
            options["resources"] = self.ray_resources
        runtime_env = with_shipped_code(merge_runtime_env(settings.runtime_env, self.runtime_env))
        if runtime_env:
            options["runtime_env"] = runtime_env
        ident = self._ray_identity
        key = "/".join(str(p) for p in (self.dag_id, ident.get("run_id"), self.task_id, ident.get("map_index", -1),
                                        ident.get("try_number", 1), uuid.uuid4().hex[:8]))
        run = RayTaskRun(key=key, task_label=self.task_label, namespace=settings.namespace,
                         shards=settings.owner_shards, lease_s=settings.lease_timeout, log=self.log)
        self._ray_run = run
        keep = False
        try:
            run.submit(self.python_callable, args, kwargs, options, job=job, inputs_digest=inputs)
            status = run.wait()
            if status["state"] != "finished":
                run.raise_failure(status)
            if not ray_xcom_backend_active():
                return run.fetch()
            if not self.do_xcom_push:
                return None
            written = run.events.get("checkpoint")
            stored = None if job is None or not written else {
                "uri": written["uri"], "sha256": written["sha256"], "conn_id": self._store_conn_id, "part": None}
            result = self._reference(run, Location(self.ray_conn_id, settings.namespace, run.shard), stored)
            keep = True
            return result
        except BaseException:
            run.cancel()  # timeout, SIGTERM or any local error: leave nothing running in Ray
            raise
        finally:
            if not keep:
                run.release()
            self._ray_run = None

    def _checkpoint_job(self) -> CheckpointJob:
        from airflow_ray_provider.cluster.checkpoint import TaskCheckpoint, TaskKey
        from airflow_ray_provider.cluster.worker import CheckpointJob
        from airflow_ray_provider.storage import store_for

        ident = self._ray_identity
        store, self._store_conn_id = store_for(self.ray_conn_id, self.checkpoint_path, self.checkpoint_conn_id)
        key = TaskKey(self.dag_id, str(ident.get("run_id") or ""), self.task_id, int(ident.get("map_index", -1)))
        mapped_over = not ident.get("is_mapped") and next(self.iter_mapped_dependants(), None) is not None
        split = "dict" if self.multiple_outputs else "auto" if mapped_over else None
        return CheckpointJob(TaskCheckpoint(store, key), fingerprint="",
                             reuse=not (self.checkpoint_recompute or ident.get("recompute")), split=split)

    def _reference(self, run: RayTaskRun, location: Location,
                   checkpoint: dict[str, Any] | None = None) -> RayObject | RayObjectList | RayObjectDict:
        """The XCom the backend stores: the result stays in Ray; lists and dicts are split when consumed by item."""
        from airflow_ray_provider import submission

        def owner_call(ref: Any, method: str, timeout: float) -> Any:
            return submission.bounded_get(ref, timeout=timeout, what=f"{run.owner_label}: {method} of Ray task "
                                          f"{self.task_label} (key {run.key})")

        ident = self._ray_identity
        origin = Origin(self.dag_id, self.task_id, str(ident.get("run_id") or ""), ident.get("map_index", -1))
        info = owner_call(run.owner.describe.remote(run.key), "describe", submission.OWNER_CALL_TIMEOUT_S)
        meta = info["meta"]
        names = run.events.get("names")
        mapped_over = not self._ray_identity.get("is_mapped") and next(self.iter_mapped_dependants(), None)
        if self.multiple_outputs and names is None:
            raise TypeError(f"Task {self.task_label} has multiple_outputs=True, so it must return a dict with "
                            f"string keys; it returned {meta.get('type')}")
        if names is not None and (self.multiple_outputs or mapped_over):
            items = owner_call(run.owner.split.remote(run.key, names), "split", submission.SPLIT_TIMEOUT_S)
            return RayObjectDict({n: _item(i, location, origin, n, _part(checkpoint, k))
                                  for k, (n, i) in enumerate(zip(names, items, strict=True))},
                                 location=location, origin=origin, type=meta.get("type", "dict"),
                                 summary=meta.get("summary", ""))
        if mapped_over and meta.get("type") in ("list", "tuple"):
            items = owner_call(run.owner.split.remote(run.key, None), "split", submission.SPLIT_TIMEOUT_S)
            return RayObjectList([_item(i, location, origin, str(n), _part(checkpoint, n))
                                  for n, i in enumerate(items)],
                                 location=location, origin=origin, kind=meta["type"], type=meta["type"],
                                 summary=meta.get("summary", ""))
        return _item(info, location, origin, None, checkpoint)

    def on_kill(self) -> None:
        run = self._ray_run
        if run is not None:
            run.cancel()



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

    from ray import cloudpickle

    def identity(v: Any) -> Any:
        if isinstance(v, RayObject):
            return ("ray-object", v.checkpoint["sha256"] if v.checkpoint else v.key, v.item)
        if isinstance(v, dict):
            return {k: identity(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(identity(x) for x in v) if type(v) in (list, tuple) else [identity(x) for x in v]
        return v

    try:
        return hashlib.sha256(cloudpickle.dumps(identity(value), protocol=5)).hexdigest()
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


def by_reference(value: Any, conn_id: str, namespace: str, task_label: str, log: Any) -> Any:
    """Swap upstream ``RayObject`` references (nested anywhere) for refs the Ray worker resolves.

    Upstream objects the cluster lost are put back from their checkpoints first.
    """
    from airflow_ray_provider.cluster.worker import UpstreamRef
    from airflow_ray_provider.xcom.backend import object_refs, worker_checkpoint

    found: list[RayObject] = []

    def collect(v: Any) -> None:
        if isinstance(v, RayObject):
            found.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                collect(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                collect(x)

    collect(value)
    if not found:
        return value
    for obj in found:
        if (obj.location.conn_id, obj.location.namespace) != (conn_id, namespace):
            raise ValueError(
                f"Task {task_label} runs on Ray connection {conn_id!r} (namespace {namespace!r}), but its input "
                f"from {obj.origin.label(obj.item)} lives on {obj.location.conn_id!r} "
                f"(namespace {obj.location.namespace!r}); results cannot cross clusters by reference"
            )
    refs = dict(zip(map(id, found), object_refs(found, restore_log=log), strict=True))

    def swap(v: Any) -> Any:
        if isinstance(v, RayObject):
            return UpstreamRef(refs[id(v)], f"task {v.origin.task_id!r} ({v.origin.label(v.item)})",
                               worker_checkpoint(v))
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return tuple(swap(x) for x in v)
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    return swap(value)
