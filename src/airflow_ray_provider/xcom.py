"""``RayXComBackend``: task results stay in Ray's object store; the metadata DB holds a reference.

Enable with ``AIRFLOW__CORE__XCOM_BACKEND=airflow_ray_provider.xcom.RayXComBackend``.

* A ``@task.ray`` result never leaves Ray: the task returns a :class:`~.reference.RayObject`
  and the DB row gets its JSON reference (type, size, summary, node) for the UI.
* A downstream ``@task.ray`` gets references, not values: its Ray worker resolves them,
  zero-copy on the same node, so the bytes never pass through an Airflow process.
* Everyone else (plain tasks, classic operators, Jinja, ``ti.xcom_pull``) gets the value,
  fetched from Ray on demand.
* Plain tasks' values stay in the DB as with ``BaseXCom``, unless their JSON form is larger
  than ``[ray] xcom_threshold`` bytes; then they are put in Ray too.
* ``purge`` (XCom deleted, task cleared and rerun) releases the objects;
  ``airflow-ray xcom gc`` releases those of deleted runs and, after ``[ray] xcom_retention``,
  of finished runs.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from airflow.sdk.bases.xcom import BaseXCom

from airflow_ray_provider.reference import (
    MARKER,
    AnyReference,
    Location,
    Origin,
    RayObject,
    RayObjectDict,
    RayObjectList,
    RayXComObjectLost,
    RayXComReferenceError,
    all_objects,
    is_reference,
    parse_reference,
    with_origin,
)
from airflow_ray_provider.settings import RayConnectionError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 1024 * 1024


def xcom_threshold() -> int:
    from airflow.sdk.configuration import conf

    return conf.getint("ray", "xcom_threshold", fallback=DEFAULT_THRESHOLD)


def xcom_conn_id() -> str:
    from airflow.sdk.configuration import conf

    return conf.get("ray", "xcom_conn_id", fallback="ray_default") or "ray_default"


class RayXComBackend(BaseXCom):
    """Keeps ``@task.ray`` results (and large plain-task values) in Ray's object store."""

    @staticmethod
    def serialize_value(
        value: Any,
        *,
        key: str | None = None,
        task_id: str | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        map_index: int | None = None,
    ) -> Any:
        origin = Origin(dag_id or "", task_id or "", run_id or "", -1 if map_index is None else map_index)
        if isinstance(value, (RayObject, RayObjectList, RayObjectDict)):
            return with_origin(value, origin).to_json()
        serialized = BaseXCom.serialize_value(value, key=key, task_id=task_id, dag_id=dag_id, run_id=run_id,
                                              map_index=map_index)
        if is_reference(serialized):
            raise ValueError(f"Task {task_id!r} returned a dict with the reserved key {MARKER!r}; "
                             f"the Ray XCom backend uses it to mark references")
        threshold = xcom_threshold()
        if threshold >= 0 and len(json.dumps(serialized, default=str)) > threshold:
            return put_value(value, origin, key or BaseXCom.XCOM_RETURN_KEY).to_json()
        return serialized

    @staticmethod
    def deserialize_value(result: Any) -> Any:
        raw = result.value
        if isinstance(raw, str) and MARKER in raw[:64]:
            try:
                raw = json.loads(raw)
            except ValueError:
                pass
        if not is_reference(raw):
            return BaseXCom.deserialize_value(result)
        ref = parse_reference(raw)
        if consumer_is_ray_task():
            return ref  # the Ray worker resolves it; the bytes never come through this process
        return fetch(ref)

    @staticmethod
    def purge(xcom: Any, *args: Any) -> None:
        raw = getattr(xcom, "value", None)
        if not is_reference(raw):
            return
        try:
            ref = parse_reference(raw)
        except RayXComReferenceError as exc:
            log.warning("Not releasing a malformed Ray XCom reference: %s", exc)
            return
        try:
            release(all_objects(ref))
        except Exception as exc:  # noqa: BLE001 - deleting the XCom row must not fail; gc catches it later
            log.warning("Could not release Ray objects of %s: %s", ref.origin.label(), exc)


def consumer_is_ray_task() -> bool:
    """True while a ``@task.ray`` task (mapped or not) resolves its inputs or runs."""
    try:
        from airflow.sdk import get_current_context

        context = get_current_context()
    except Exception:  # noqa: BLE001 - no task context: API server, notebook, CLI
        return False
    from airflow_ray_provider.decorators import RayDecoratedOperator

    ti = context.get("ti")
    task = getattr(ti, "task", None) or context.get("task")
    if isinstance(task, RayDecoratedOperator):
        return True
    operator_class = getattr(task, "operator_class", None)
    return isinstance(operator_class, type) and issubclass(operator_class, RayDecoratedOperator)


# -- talking to the owners ------------------------------------------------------------------
def _connect(location: Location) -> None:
    from airflow_ray_provider.hooks import RayHook

    hook = RayHook(location.conn_id)
    if hook.settings.namespace != location.namespace:
        raise RayXComReferenceError(
            f"Ray XCom reference names namespace {location.namespace!r}, but connection {location.conn_id!r} "
            f"now uses {hook.settings.namespace!r}"
        )
    hook.get_conn()


def _owner(location: Location) -> Any:
    from airflow_ray_provider.owner import get_owner

    return get_owner(location.namespace, location.owner)


def lost_message(obj: RayObject, reason: str) -> str:
    return (f"The result of {obj.origin.label(obj.item)} is gone from Ray ({reason}; key {obj.key}). "
            f"The Ray cluster or its owner actor restarted, or the object was released. Rerun that task, "
            f"or set checkpoint=True on it so a lost result can be restored.")


def object_refs(objects: list[RayObject], restore_log: Any = None) -> list[Any]:
    """The ``ObjectRef`` of each object, in order; :class:`RayXComObjectLost` if any is gone.

    With ``restore_log``, objects the owner no longer holds but that have a checkpoint are
    first put back into the object store (under their old key) from that checkpoint.
    """
    import ray

    by_owner: dict[Location, list[int]] = {}
    for i, obj in enumerate(objects):
        by_owner.setdefault(obj.location, []).append(i)
    refs: list[Any] = [None] * len(objects)
    for location, indexes in by_owner.items():
        _connect(location)
        found = ray.get(_owner(location).get_many.remote([objects[i].key for i in indexes]))
        for i, ref in zip(indexes, found, strict=True):
            if ref is None and objects[i].checkpoint is not None and restore_log is not None:
                ref = _restore_into_ray(objects[i], restore_log)
            if ref is None:
                raise RayXComObjectLost(lost_message(objects[i], "the owner actor does not hold it"))
            refs[i] = ref
    return refs


def checkpoint_of_object(obj: RayObject) -> Any:
    """The upstream task's :class:`~.checkpoint.TaskCheckpoint`, rebuilt from the reference and validated."""
    from airflow_ray_provider.checkpoint import CheckpointError
    from airflow_ray_provider.hooks import RayHook
    from airflow_ray_provider.storage import checkpoint_of

    assert obj.checkpoint is not None
    try:
        return checkpoint_of(obj.checkpoint, obj.origin.dag_id, obj.origin.run_id, obj.origin.task_id,
                             obj.origin.map_index, RayHook(obj.location.conn_id).settings.checkpoint_storage_options)
    except CheckpointError as exc:
        raise RayXComReferenceError(f"Ray XCom reference of {obj.origin.label(obj.item)}: {exc}") from None


def worker_checkpoint(obj: RayObject) -> tuple[Any, int | None, str] | None:
    """``(checkpoint, part, sha256)``: what a Ray worker needs to restore ``obj`` (``checkpoint.restore_result``)."""
    if obj.checkpoint is None:
        return None
    return checkpoint_of_object(obj), obj.checkpoint["part"], obj.checkpoint["sha256"]


def _restore_into_ray(obj: RayObject, log: Any) -> Any:
    """Load ``obj`` from its checkpoint in a Ray task the owner actor submits, under the same key."""
    import ray

    from airflow_ray_provider.checkpoint import restore_result
    from airflow_ray_provider.hooks import RayHook
    from airflow_ray_provider.submission import RayTaskRun

    assert obj.checkpoint is not None
    restore_args = worker_checkpoint(obj)
    settings = RayHook(obj.location.conn_id).settings
    log.warning("The result of %s is gone from Ray; restoring it from its checkpoint %s",
                obj.origin.label(obj.item), obj.checkpoint["uri"])
    started = time.monotonic()
    run = RayTaskRun(key=obj.key, task_label=f"restore {obj.origin.label(obj.item)}", namespace=obj.location.namespace,
                     shards=1, lease_s=settings.lease_timeout, log=log, shard=obj.location.owner)
    try:
        run.submit(restore_result, restore_args, {}, {"num_cpus": 0, "name": f"restore:{obj.key}"[:200]})
    except KeyError:
        pass  # another consumer is restoring it right now: wait for theirs
    else:
        status = run.wait()
        if status["state"] != "finished":
            run.raise_failure(status)
    info = ray.get(run.owner.describe.remote(obj.key))
    log.info("Restored %s from its checkpoint in %.2fs (%s bytes)", obj.origin.label(obj.item),
             time.monotonic() - started, info.get("size"))
    (ref,) = ray.get(run.owner.get.remote(obj.key))
    return ref


def fetch(ref: AnyReference) -> Any:
    """The Python value behind a reference (this process pulls the bytes).

    Objects Ray lost, or a cluster that cannot be reached, are read straight from their
    checkpoints when every object has one.
    """
    import ray

    objects = all_objects(ref)
    try:
        refs = object_refs(objects)
        values = ray.get(refs)
    except (RayXComObjectLost, RayConnectionError, ray.exceptions.ObjectLostError,
            ray.exceptions.OwnerDiedError) as exc:
        if any(obj.checkpoint is None for obj in objects):
            if isinstance(exc, RayXComObjectLost | RayConnectionError):
                raise
            raise RayXComObjectLost(lost_message(objects[0], type(exc).__name__)) from None
        log.warning("The result of %s is not available from Ray (%s); reading it from its checkpoint",
                    objects[0].origin.label(), type(exc).__name__)
        values = [checkpoint_of_object(obj).load_result(part=obj.checkpoint["part"],
                                                        expected_sha256=obj.checkpoint["sha256"])
                  for obj in objects if obj.checkpoint is not None]
    if isinstance(ref, RayObject):
        return values[0]
    if isinstance(ref, RayObjectDict):
        return dict(zip(ref.keys(), values, strict=True))
    return tuple(values) if ref.kind == "tuple" else list(values)


def release(objects: Iterable[RayObject]) -> int:
    """Let Ray free these objects; returns how many the owners still held."""
    import ray

    by_owner: dict[Location, list[str]] = {}
    for obj in objects:
        by_owner.setdefault(obj.location, []).append(obj.key)
    released = 0
    for location, keys in by_owner.items():
        _connect(location)
        released += ray.get(_owner(location).release.remote(keys), timeout=60)
    return released


def put_value(value: Any, origin: Origin, xcom_key: str) -> RayObject:
    """Put a plain task's large value into Ray, owned by an owner actor so it outlives this process."""
    import ray

    from airflow_ray_provider.describe import describe
    from airflow_ray_provider.hooks import RayHook
    from airflow_ray_provider.owner import get_owner, shard_for

    conn_id = xcom_conn_id()
    hook = RayHook(conn_id)
    hook.get_conn()
    settings = hook.settings
    key = "/".join((origin.dag_id, origin.run_id, origin.task_id, str(origin.map_index), f"xcom:{xcom_key}",
                    uuid.uuid4().hex[:8]))
    shard = shard_for(key, settings.owner_shards)
    described = describe(value)
    payload = ray.put(value)
    info = ray.get(get_owner(settings.namespace, shard).adopt.remote(key, [payload], described))
    del payload
    return RayObject(key=key, location=Location(conn_id, settings.namespace, shard), type=described["type"],
                     size=info.get("size"), summary=described["summary"], nodes=tuple(info.get("node_ids") or ()),
                     origin=origin)
