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
* Every reference row is signed with the deployment's ``[ray] secret_key`` and checked on
  every read (see ``reference.py``); a row edited through the REST API, forged by a task,
  or copied from another task's row is refused before anything is fetched or unpickled.
  A string value is always a string.
* ``purge`` (XCom deleted, task cleared and rerun) releases the objects;
  ``airflow-ray xcom gc`` releases those of deleted runs and, after ``[ray] xcom_retention``,
  of finished runs.
"""

from __future__ import annotations

import collections
import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from airflow.sdk.bases.xcom import BaseXCom

from airflow_ray_provider.config import xcom_conn_id, xcom_threshold
from airflow_ray_provider.exceptions import RayConnectionError, RayXComObjectLost, RayXComReferenceError
from airflow_ray_provider.xcom.reference import (
    MARKER,
    AnyReference,
    Location,
    Origin,
    RayObject,
    RayObjectDict,
    RayObjectList,
    all_objects,
    is_reference,
    parse_reference,
    signed_json,
    with_origin,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Read:
    """The XCom row a pull asked for; ``None`` fields were left open by the caller."""

    dag_id: str | None
    task_id: str | None
    run_id: str | None
    map_index: int | None
    key: str | None


# Set while BaseXCom's get_one/get_all fetch rows, so deserialize_value can check that a
# reference was written for the row it was read from (the API hands it only the value).
_reading: contextvars.ContextVar[Read | None] = contextvars.ContextVar("airflow_ray_xcom_read", default=None)


@contextmanager
def _read_as(read: Read) -> Iterator[None]:
    token = _reading.set(read)
    try:
        yield
    finally:
        _reading.reset(token)


@dataclass(frozen=True)
class SequencePlace:
    """Where a value handed to ``deserialize_value`` alone sits in a read of a task's rows by map index.

    Airflow reads a mapped task's whole output (``LazyXComSequence``, ``get_all``) as values without their
    rows. ``read`` names the task whose rows these are (the map index left open); ``offset`` is the value's
    position among them in map-index order, where known (rows are ordered by map index, so a genuine
    reference at offset k has a map index of k or more); ``seen`` maps the map indexes already read through
    the same sequence to their offsets, so a row copied over another of the same task is refused too.
    """

    read: Read | None
    offset: int | None
    seen: dict[int, int]


# Map indexes read so far through one sequence object (a LazyXComSequence, a slice's reply), for the last few
# such objects. Keyed by identity and holding the object, so an id is never reused while its entry lives:
# LazyXComSequence hashes and compares by reading every item, so it cannot be a dictionary key itself.
_SEQUENCES_KEPT = 32
_seen_by_sequence: collections.OrderedDict[int, tuple[Any, dict[int, int]]] = collections.OrderedDict()


def _seen(sequence: Any) -> dict[int, int]:
    entry = _seen_by_sequence.get(id(sequence))
    if entry is None or entry[0] is not sequence:
        entry = _seen_by_sequence[id(sequence)] = (sequence, {})
        while len(_seen_by_sequence) > _SEQUENCES_KEPT:
            _seen_by_sequence.popitem(last=False)
    _seen_by_sequence.move_to_end(id(sequence))
    return entry[1]


def sequence_place(value: Any) -> SequencePlace | None:
    """Find, from the callers' frames, the sequence read ``value`` comes from (``None``: not from one).

    Airflow's task SDK passes only the value (``lazy_sequence.LazyXComSequence.__getitem__``,
    ``BaseXCom.get_all``: the same code in Airflow 3.2 and 3.3), so the reader is found where it is: the
    frame holding the ``LazyXComSequence`` (``self``) and the offset (``key``), or the slice reply (``msg``)
    the value is an item of. tests/integration/test_trust.py fails if a new Airflow moves them.
    """
    frame = sys._getframe(1)
    for _ in range(6):
        frame = frame.f_back
        if frame is None:
            return None
        local = frame.f_locals
        sequence = local.get("self")
        reply = local.get("msg")
        items = getattr(reply, "root", None)
        if type(sequence).__name__ == "LazyXComSequence":
            xcom_arg = sequence._xcom_arg
            read = Read(xcom_arg.operator.dag_id, xcom_arg.operator.task_id, sequence._ti.run_id, None, xcom_arg.key)
        elif isinstance(items, list) and local.get("cls") is not None:  # BaseXCom.get_all
            read, sequence = None, reply  # its row is named by RayXComBackend.get_all's _read_as
        else:
            continue
        key = local.get("key")
        offset: int | None = None
        if isinstance(key, int) and not isinstance(key, bool):  # one item, by offset
            offset = key if key >= 0 else None
        elif isinstance(items, list):  # a slice: the value's place in the reply
            sequence = reply
            index = next((i for i, item in enumerate(items) if item is value), None)
            start, step = local.get("start"), local.get("step")
            if index is not None and (start is None or start >= 0) and step in (None, 1):
                offset = (start or 0) + index
        # Only a known offset is compared with what the same sequence read before.
        return SequencePlace(read, offset, _seen(sequence) if offset is not None else {})
    return None


def check_place(ref: AnyReference, place: SequencePlace) -> None:
    """Refuse a reference out of its place in a read of a task's rows by map index (see SequencePlace)."""
    if place.offset is None:
        return
    index = ref.origin.map_index
    where = f"dag {ref.origin.dag_id!r}, task {ref.origin.task_id!r}, run {ref.origin.run_id!r}"
    if index < place.offset:
        raise RayXComReferenceError(
            f"Ray XCom reference read as item {place.offset} of the mapped output of {where} was written for map "
            f"index {index}: a reference copied from another row is refused. Nothing was fetched.")
    earlier = place.seen.setdefault(index, place.offset)
    if earlier != place.offset:
        raise RayXComReferenceError(
            f"Ray XCom reference of map index {index} of {where} was read twice from one mapped output (items "
            f"{earlier} and {place.offset}): a reference copied from another row is refused. Nothing was fetched.")


def check_origin(ref: AnyReference, read: Read | None, row_key: str | None = None) -> None:
    """Refuse a (validly signed) reference found in a row other than the one it was written to."""
    origin = ref.origin
    wanted = {"dag_id": read.dag_id, "task_id": read.task_id, "run_id": read.run_id,
              "map_index": read.map_index, "xcom_key": read.key} if read is not None else {}
    if row_key is not None:
        wanted["xcom_key"] = row_key
    wrong = {name: value for name, value in wanted.items() if value is not None and getattr(origin, name) != value}
    if wrong:
        found = ", ".join(f"{name}={getattr(origin, name)!r}" for name in wrong)
        asked = ", ".join(f"{name}={value!r}" for name, value in wrong.items())
        raise RayXComReferenceError(
            f"Ray XCom reference read from the row with {asked} was written for {found}: a reference copied "
            f"from another task's row is refused. Nothing was fetched.")


class RayXComBackend(BaseXCom):
    """Keeps ``@task.ray`` results (and large plain-task values) in Ray's object store."""

    @classmethod
    def get_one(cls, *, key: str, dag_id: str, task_id: str, run_id: str, map_index: int | None = None,
                include_prior_dates: bool = False) -> Any | None:
        with _read_as(Read(dag_id, task_id, None if include_prior_dates else run_id, map_index, key)):
            return super().get_one(key=key, dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index,
                                   include_prior_dates=include_prior_dates)

    @classmethod
    async def aget_one(cls, *, key: str, dag_id: str, task_id: str, run_id: str, map_index: int | None = None,
                       include_prior_dates: bool = False) -> Any | None:
        with _read_as(Read(dag_id, task_id, None if include_prior_dates else run_id, map_index, key)):
            return await super().aget_one(key=key, dag_id=dag_id, task_id=task_id, run_id=run_id,
                                          map_index=map_index, include_prior_dates=include_prior_dates)

    @classmethod
    def get_all(cls, *, key: str, dag_id: str, task_id: str, run_id: str, include_prior_dates: bool = False) -> Any:
        with _read_as(Read(dag_id, task_id, None if include_prior_dates else run_id, None, key)):
            return super().get_all(key=key, dag_id=dag_id, task_id=task_id, run_id=run_id,
                                   include_prior_dates=include_prior_dates)

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
        origin = Origin(dag_id or "", task_id or "", run_id or "", -1 if map_index is None else map_index,
                        key or BaseXCom.XCOM_RETURN_KEY)
        if isinstance(value, (RayObject, RayObjectList, RayObjectDict)):
            return signed_json(with_origin(value, origin))
        serialized = BaseXCom.serialize_value(value, key=key, task_id=task_id, dag_id=dag_id, run_id=run_id,
                                              map_index=map_index)
        if is_reference(serialized):
            raise ValueError(f"Task {task_id!r} returned a dict with the reserved key {MARKER!r}; "
                             f"the Ray XCom backend uses it to mark references")
        threshold = xcom_threshold()
        if threshold >= 0 and len(json.dumps(serialized, default=str)) > threshold:
            held = put_value(value, origin, key or BaseXCom.XCOM_RETURN_KEY)
            if held is not None:
                return signed_json(held)
        return serialized

    @staticmethod
    def deserialize_value(result: Any) -> Any:
        raw = result.value
        if not is_reference(raw):  # a string is data, even one that looks like a reference
            return BaseXCom.deserialize_value(result)
        ref = parse_reference(raw)
        row_key = getattr(result, "key", None)
        read = _reading.get()
        # A value without its row (Airflow's one-field wrappers): an item of a mapped task's whole output
        # (LazyXComSequence, get_all). Across runs (include_prior_dates) map indexes repeat: no place to check.
        place = None
        if getattr(result, "_fields", None) == ("value",) and (read is None or read.run_id is not None):
            place = sequence_place(raw)
        check_origin(ref, read if read is not None else place.read if place is not None else None,
                     row_key if isinstance(row_key, str) else None)
        if place is not None:
            check_place(ref, place)
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
    ti = context.get("ti")
    task = getattr(ti, "task", None) or context.get("task")
    if getattr(task, "runs_on_ray", False) is True:  # RayPythonOperator and @task.ray, mapped or not
        return True
    operator_class = getattr(task, "operator_class", None)  # a mapped task before it unmaps
    return isinstance(operator_class, type) and getattr(operator_class, "runs_on_ray", False) is True


# -- talking to the owners ------------------------------------------------------------------
def _gateway(location: Location) -> Any:
    """The gateway client for the reference's connection, or None when that connection makes this process a Ray
    driver; raises if the connection now names another namespace than the reference."""
    from airflow_ray_provider.hooks.ray import RayHook

    settings = RayHook(location.conn_id).settings
    if settings.namespace != location.namespace:
        raise RayXComReferenceError(
            f"Ray XCom reference names namespace {location.namespace!r}, but connection {location.conn_id!r} "
            f"now uses {settings.namespace!r}"
        )
    if settings.gateway_url is None:
        return None
    from airflow_ray_provider.gateway_client import client_for

    return client_for(settings)


def _connect(location: Location) -> None:
    from airflow_ray_provider.hooks.ray import RayHook

    if _gateway(location) is None:
        RayHook(location.conn_id).get_conn()


def _owner(location: Location) -> Any:
    from airflow_ray_provider.cluster.owner import get_owner

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

    from airflow_ray_provider.cluster.owner import owner_label
    from airflow_ray_provider.submission import OWNER_CALL_TIMEOUT_S, bounded_get

    by_owner: dict[Location, list[int]] = {}
    for i, obj in enumerate(objects):
        by_owner.setdefault(obj.location, []).append(i)
    refs: list[Any] = [None] * len(objects)
    for location, indexes in by_owner.items():
        _connect(location)
        found = bounded_get(_owner(location).get_many.remote([objects[i].key for i in indexes]),
                            timeout=OWNER_CALL_TIMEOUT_S,
                            what=f"{owner_label(location.namespace, location.owner)}: get_many of "
                                 f"{len(indexes)} key(s), first {objects[indexes[0]].key!r}")
        for i, ref in zip(indexes, found, strict=True):
            if ref is None and objects[i].checkpoint is not None and restore_log is not None:
                ref = _restore_into_ray(objects[i], restore_log)
            if ref is None:
                raise RayXComObjectLost(lost_message(objects[i], "the owner actor does not hold it"))
            refs[i] = ref
    return refs


def checkpoint_of_object(obj: RayObject) -> Any:
    """The upstream task's :class:`~.checkpoint.TaskCheckpoint`, rebuilt from the reference and validated."""
    from airflow_ray_provider.exceptions import CheckpointError
    from airflow_ray_provider.hooks.ray import RayHook
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

    from airflow_ray_provider.cluster.checkpoint import restore_result
    from airflow_ray_provider.hooks.ray import RayHook
    from airflow_ray_provider.submission import OWNER_CALL_TIMEOUT_S, RayTaskRun, bounded_get

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
        log.info("Another consumer is restoring %s right now; waiting for it", obj.origin.label(obj.item))
    status = run.wait()
    if status["state"] != "finished":
        try:
            run.raise_failure(status)
        finally:
            # A failed restore must not stay under the object's key: the next consumer would get the
            # failure back as if it were the object, and never try the checkpoint again.
            try:
                bounded_get(run.owner.release.remote([obj.key]), timeout=OWNER_CALL_TIMEOUT_S,
                            what=f"{run.owner_label}: release of key {obj.key!r}")
            except Exception as exc:  # noqa: BLE001 - the failure above is what the task reports
                log.warning("Could not drop the failed restore of %s (key %s) from its owner: %s",
                            obj.origin.label(obj.item), obj.key, exc)
    info = bounded_get(run.owner.describe.remote(obj.key), timeout=OWNER_CALL_TIMEOUT_S,
                       what=f"{run.owner_label}: describe of key {obj.key!r}")
    log.info("Restored %s from its checkpoint in %.2fs (%s bytes)", obj.origin.label(obj.item),
             time.monotonic() - started, info.get("size"))
    ref = run.result_ref()
    return ref


def fetch(ref: AnyReference) -> Any:
    """The Python value behind a reference (this process pulls the bytes).

    Objects Ray lost, or a cluster that cannot be reached, are read straight from their
    checkpoints when every object has one.
    """
    objects = all_objects(ref)
    try:
        values = _values(objects)
    except (RayXComObjectLost, RayConnectionError) as exc:
        if any(obj.checkpoint is None for obj in objects):
            raise
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


def _values(objects: list[RayObject]) -> list[Any]:
    """The objects' values, in order, through the gateway or as a Ray driver; ``RayXComObjectLost`` if one is gone."""
    from airflow_ray_provider.exceptions import GatewayError

    gateway = _gateway(objects[0].location)  # a reference's objects share one location
    if gateway is not None:
        values = []
        for obj in objects:
            try:
                values.append(gateway.value(obj.key, obj.location.namespace, obj.location.owner))
            except GatewayError as exc:
                if exc.status in (404, 409):  # no such key, or not a finished value
                    raise RayXComObjectLost(lost_message(obj, str(exc))) from None
                raise
        return values
    import ray

    from airflow_ray_provider.submission import FETCH_TIMEOUT_S, bounded_get

    try:
        refs = object_refs(objects)
        return bounded_get(refs, timeout=FETCH_TIMEOUT_S,
                           what=f"the value of {objects[0].origin.label()} ({len(refs)} object(s))")
    except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
        raise RayXComObjectLost(lost_message(objects[0], type(exc).__name__)) from None


def release(objects: Iterable[RayObject]) -> int:
    """Let Ray free these objects; returns how many the owners still held."""

    from airflow_ray_provider.cluster.owner import owner_label
    from airflow_ray_provider.submission import OWNER_CALL_TIMEOUT_S, bounded_get

    by_owner: dict[Location, list[str]] = {}
    for obj in objects:
        by_owner.setdefault(obj.location, []).append(obj.key)
    released = 0
    for location, keys in by_owner.items():
        gateway = _gateway(location)
        if gateway is not None:
            released += gateway.release(keys, location.namespace, location.owner)
            continue
        _connect(location)
        released += bounded_get(_owner(location).release.remote(keys), timeout=OWNER_CALL_TIMEOUT_S,
                                what=f"{owner_label(location.namespace, location.owner)}: release of "
                                     f"{len(keys)} key(s)")
    return released


def put_value(value: Any, origin: Origin, xcom_key: str) -> RayObject | None:
    """Put a plain task's large value into Ray, owned by an owner actor so it outlives this process.

    None through a gateway, which has no way in for a value yet: it stays in the metadata DB, as without the
    Ray XCom backend."""

    from airflow_ray_provider.cluster.describe import describe
    from airflow_ray_provider.cluster.owner import get_owner, owner_label, shard_for
    from airflow_ray_provider.hooks.ray import RayHook
    from airflow_ray_provider.submission import FETCH_TIMEOUT_S, bounded_get

    conn_id = xcom_conn_id()
    hook = RayHook(conn_id)
    settings = hook.settings
    if settings.gateway_url is not None:
        log.info("XCom %s of %s stays in the metadata DB: connection %r reaches Ray through a gateway, which "
                 "takes no values from plain tasks yet", xcom_key, origin.label(), conn_id)
        return None
    import ray

    hook.get_conn()
    key = "/".join((origin.dag_id, origin.run_id, origin.task_id, str(origin.map_index), f"xcom:{xcom_key}",
                    uuid.uuid4().hex[:8]))
    shard = shard_for(key, settings.owner_shards)
    described = describe(value)
    payload = ray.put(value)
    info = bounded_get(get_owner(settings.namespace, shard).adopt.remote(key, [payload], described),
                       timeout=FETCH_TIMEOUT_S, what=f"{owner_label(settings.namespace, shard)}: adopt of key {key!r}")
    del payload
    return RayObject(key=key, location=Location(conn_id, settings.namespace, shard), type=described["type"],
                     size=info.get("size"), summary=described["summary"], nodes=tuple(info.get("node_ids") or ()),
                     origin=origin)
