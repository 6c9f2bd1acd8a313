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


def object_refs(objects: list[RayObject]) -> list[Any]:
    """The ``ObjectRef`` of each object, in order; :class:`RayXComObjectLost` if any is gone."""
    import ray

    by_owner: dict[Location, list[int]] = {}
    for i, obj in enumerate(objects):
        by_owner.setdefault(obj.location, []).append(i)
    refs: list[Any] = [None] * len(objects)
    for location, indexes in by_owner.items():
        _connect(location)
        found = ray.get(_owner(location).get_many.remote([objects[i].key for i in indexes]))
        for i, ref in zip(indexes, found, strict=True):
            if ref is None:
                raise RayXComObjectLost(lost_message(objects[i], "the owner actor does not hold it"))
            refs[i] = ref
    return refs


def fetch(ref: AnyReference) -> Any:
    """The Python value behind a reference (this process pulls the bytes)."""
    import ray

    objects = all_objects(ref)
    refs = object_refs(objects)
    try:
        values = ray.get(refs)
    except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
        raise RayXComObjectLost(lost_message(objects[0], type(exc).__name__)) from None
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
