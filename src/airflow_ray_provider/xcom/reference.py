"""What the metadata DB holds for a result that lives in Ray: a small, validated JSON reference.

A reference says what the object is (summary, type, size, nodes, checkpoint) for the
UI, names it (owner namespace, owner shard, key), and records where it came from (dag,
task, run, map index, XCom key). Never the data, never a pickle.

Anyone who may edit XCom rows (the REST API, a task returning a crafted dict) can write
what looks like a reference, and a reference decides which object is fetched and which
checkpoint is restored and unpickled. So every reference is signed (HMAC, the
deployment's ``[ray] secret_key``) over all of its fields when the backend writes it,
and :func:`parse_reference` refuses any row whose signature does not verify before it
looks at anything else. A plain string is never parsed as a reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from airflow_ray_provider.cluster.signing import REFERENCE, sign, verify
from airflow_ray_provider.exceptions import RayXComReferenceError

MARKER = "__airflow_ray__"
VERSION = 2  # 1 was unsigned; such rows are refused
SIGNATURE = "signature"
MAX_ITEMS = 100_000

_KEY = re.compile(r"[^\x00]{1,1024}")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,250}")
_NODE = re.compile(r"[0-9a-f]{1,128}")
_TOP_FIELDS = {MARKER, "version", "conn_id", "namespace", "owner", "origin", "kind", "key", "type", "size",
               "summary", "nodes", "checkpoint", "items", SIGNATURE}
_ORIGIN_FIELDS = {"dag_id", "task_id", "run_id", "map_index", "xcom_key"}
_ITEM_FIELDS = {"key", "type", "size", "summary", "nodes", "checkpoint"}


@dataclass(frozen=True)
class Origin:
    """The task instance that produced the object."""

    dag_id: str = ""
    task_id: str = ""
    run_id: str = ""
    map_index: int = -1
    xcom_key: str = "return_value"

    def label(self, item: str | None = None) -> str:
        text = f"dag {self.dag_id!r}, task {self.task_id!r}, run {self.run_id!r}, map index {self.map_index}"
        return f"{text}, item {item}" if item is not None else text


@dataclass(frozen=True)
class Location:
    """Which owner actor holds the object, on which cluster connection."""

    conn_id: str
    namespace: str
    owner: int


@dataclass(frozen=True)
class RayObject:
    """A reference to one object in Ray's object store.

    Inside a ``@task.ray`` task's argument resolution this is what XCom pulls return;
    the worker receives the object itself. ``str()`` and ``repr()`` never fetch it.
    """

    key: str
    location: Location
    type: str = ""
    size: int | None = None
    summary: str = ""
    nodes: tuple[str, ...] = ()
    origin: Origin = field(default_factory=Origin)
    item: str | None = None  # the item name/index when this is part of a split list or dict
    # Its durable copy, when the task had checkpoint=True: {"uri", "sha256", "conn_id", "part"}.
    checkpoint: dict[str, Any] | None = field(default=None, hash=False)

    def __repr__(self) -> str:
        size = "" if self.size is None else f", {_human(self.size)}"
        where = f" of {self.origin.task_id}" if self.origin.task_id else ""
        item = f"[{self.item}]" if self.item is not None else ""
        return f"<Ray object{where}{item}: {self.summary or self.type}{size}>"

    __str__ = __repr__

    def item_json(self) -> dict[str, Any]:
        # What a person reading the XCom tab wants comes first; the machine fields follow.
        return {"summary": self.summary, "type": self.type, "size": self.size, "nodes": list(self.nodes),
                "checkpoint": self.checkpoint, "key": self.key}

    def to_json(self) -> dict[str, Any]:
        return {**self.item_json(), **_head(self.location, self.origin, "object")}

    def with_origin(self, origin: Origin) -> RayObject:
        return replace(self, origin=origin)


class RayObjectList(list):  # list, so Airflow can map over it and index it without fetching
    """A list/tuple result split into one Ray object per item."""

    def __init__(self, items: list[RayObject], *, location: Location, origin: Origin, kind: str = "list",
                 type: str = "list", summary: str = "") -> None:
        super().__init__(items)
        self.location, self.origin, self.kind, self.type, self.summary = location, origin, kind, type, summary

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "type": self.type, "size": _total(self),
                **_head(self.location, self.origin, self.kind), "items": [i.item_json() for i in self]}

    def __repr__(self) -> str:
        return f"<Ray objects of {self.origin.task_id}: {self.summary or self.type}, {len(self)} items>"


class RayObjectDict(dict):  # dict, so multiple_outputs and mapping over a dict work without fetching
    """A dict result split into one Ray object per value."""

    def __init__(self, items: dict[str, RayObject], *, location: Location, origin: Origin, type: str = "dict",
                 summary: str = "") -> None:
        super().__init__(items)
        self.location, self.origin, self.kind, self.type, self.summary = location, origin, "dict", type, summary

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "type": self.type, "size": _total(self.values()),
                **_head(self.location, self.origin, "dict"), "items": {k: v.item_json() for k, v in self.items()}}

    def __repr__(self) -> str:
        return f"<Ray objects of {self.origin.task_id}: {self.summary or self.type}, keys {list(self)}>"


AnyReference = RayObject | RayObjectList | RayObjectDict


def is_reference(raw: Any) -> bool:
    return isinstance(raw, dict) and MARKER in raw


def all_objects(ref: AnyReference) -> list[RayObject]:
    if isinstance(ref, RayObject):
        return [ref]
    return list(ref.values()) if isinstance(ref, dict) else list(ref)


def with_origin(ref: AnyReference, origin: Origin) -> AnyReference:
    """The same reference, stamped with the XCom row it is written to."""
    if isinstance(ref, RayObject):
        return ref.with_origin(origin)
    if isinstance(ref, RayObjectDict):
        return RayObjectDict({k: v.with_origin(origin) for k, v in ref.items()}, location=ref.location,
                             origin=origin, type=ref.type, summary=ref.summary)
    return RayObjectList([v.with_origin(origin) for v in ref], location=ref.location, origin=origin,
                         kind=ref.kind, type=ref.type, summary=ref.summary)


def _head(location: Location, origin: Origin, kind: str) -> dict[str, Any]:
    return {MARKER: kind, "version": VERSION, "conn_id": location.conn_id, "namespace": location.namespace,
            "owner": location.owner, "origin": {"dag_id": origin.dag_id, "task_id": origin.task_id,
                                                "run_id": origin.run_id, "map_index": origin.map_index,
                                                "xcom_key": origin.xcom_key}}


def signed_json(ref: AnyReference, secret: bytes | None = None) -> dict[str, Any]:
    """The row the backend stores: the reference's JSON and its signature over every field."""
    body = ref.to_json()
    body[SIGNATURE] = sign(_secret(secret), REFERENCE, body)
    return body


def _secret(secret: bytes | None) -> bytes:
    if secret is not None:
        return secret
    from airflow_ray_provider.config import secret_key

    return secret_key()


def _total(items: Any) -> int | None:
    sizes = [i.size for i in items]
    return None if any(s is None for s in sizes) else sum(sizes)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


# -- parsing (everything from the DB passes here) -----------------------------------------------
def parse_reference(raw: Any, secret: bytes | None = None) -> AnyReference:
    """Validate a stored reference, verify its signature, and build it.

    Raises :class:`RayXComReferenceError` naming the problem; nothing is fetched or
    unpickled for a row that fails. ``secret`` defaults to the deployment's. The shape is
    checked first (so a malformed row says what is malformed), the signature last, before
    anything is returned.
    """
    if not isinstance(raw, dict):
        raise RayXComReferenceError(f"Ray XCom reference must be a JSON object, got {type(raw).__name__}")
    where = _where(raw)
    ref = _build(raw, where)
    unsigned = {k: v for k, v in raw.items() if k != SIGNATURE}
    if not verify(_secret(secret), REFERENCE, unsigned, raw.get(SIGNATURE)):
        raise RayXComReferenceError(
            f"Ray XCom reference {where} is not signed with this deployment's [ray] secret_key: it was edited or "
            f"forged (REST API, a task returning a look-alike dict), copied from another deployment, or this "
            f"component has a different secret_key than the one that ran the task. Nothing was fetched.")
    return ref


def _build(raw: dict[str, Any], where: str) -> AnyReference:
    unknown = set(raw) - _TOP_FIELDS
    if unknown:
        raise RayXComReferenceError(f"Ray XCom reference {where} has unknown fields {sorted(unknown)[:20]}")
    kind = raw.get(MARKER)
    if kind not in ("object", "list", "tuple", "dict"):
        raise RayXComReferenceError(f"Ray XCom reference {where}: kind {str(kind)[:50]!r} is not "
                                    f"object/list/tuple/dict")
    if raw.get("version") != VERSION:
        raise RayXComReferenceError(
            f"Ray XCom reference {where}: unsupported version {str(raw.get('version'))[:20]} (this provider "
            f"reads signed version {VERSION} references; clear and rerun the task that wrote it)")
    location = Location(
        conn_id=_match(raw, "conn_id", _NAME, where),
        namespace=_match(raw, "namespace", _NAME, where),
        owner=_int(raw, "owner", where, 0, 4096),
    )
    origin = _origin(raw.get("origin"), where)
    if kind == "object":
        return _item(raw, location, origin, None, where)
    items = raw.get("items")
    text = {"type": _text(raw, "type", where), "summary": _text(raw, "summary", where)}
    if kind == "dict":
        if not isinstance(items, dict) or len(items) > MAX_ITEMS:
            raise RayXComReferenceError(f"Ray XCom reference {where}: 'items' must be an object of at most "
                                        f"{MAX_ITEMS} entries")
        return RayObjectDict({str(k): _item(v, location, origin, str(k), where) for k, v in items.items()},
                             location=location, origin=origin, **text)
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise RayXComReferenceError(f"Ray XCom reference {where}: 'items' must be a list of at most {MAX_ITEMS}")
    return RayObjectList([_item(v, location, origin, str(i), where) for i, v in enumerate(items)],
                         location=location, origin=origin, kind=kind, **text)


def _item(raw: Any, location: Location, origin: Origin, item: str | None, where: str) -> RayObject:
    if not isinstance(raw, dict):
        raise RayXComReferenceError(f"Ray XCom reference {where}: item {item} is not an object")
    if item is not None and set(raw) - _ITEM_FIELDS:
        raise RayXComReferenceError(f"Ray XCom reference {where}: item {item} has unknown fields "
                                    f"{sorted(set(raw) - _ITEM_FIELDS)}")
    nodes = raw.get("nodes") or []
    if not isinstance(nodes, list) or len(nodes) > 1024 or not all(
        isinstance(n, str) and _NODE.fullmatch(n) for n in nodes
    ):
        raise RayXComReferenceError(f"Ray XCom reference {where}: 'nodes' must be a list of hex node ids")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise RayXComReferenceError(f"Ray XCom reference {where}: 'size' must be a non-negative integer")
    checkpoint = _checkpoint(raw.get("checkpoint"), where)
    return RayObject(key=_match(raw, "key", _KEY, where), location=location, type=_text(raw, "type", where),
                     size=size, summary=_text(raw, "summary", where), nodes=tuple(nodes), origin=origin,
                     item=item, checkpoint=checkpoint)


_CHECKPOINT_FIELDS = {"uri", "sha256", "conn_id", "part"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _checkpoint(raw: Any, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    bad = f"Ray XCom reference {where}: 'checkpoint' "
    if not isinstance(raw, dict) or set(raw) != _CHECKPOINT_FIELDS:
        raise RayXComReferenceError(bad + f"must be null or an object with {sorted(_CHECKPOINT_FIELDS)}")
    uri = raw["uri"]
    if not isinstance(uri, str) or not 0 < len(uri) <= 4096 or "\x00" in uri or "/../" in uri + "/":
        raise RayXComReferenceError(bad + f"has a malformed uri {str(uri)[:100]!r}")
    if not isinstance(raw["sha256"], str) or not _SHA256.fullmatch(raw["sha256"]):
        raise RayXComReferenceError(bad + "has a malformed sha256")
    if raw["conn_id"] is not None and not (isinstance(raw["conn_id"], str) and _NAME.fullmatch(raw["conn_id"])):
        raise RayXComReferenceError(bad + "has a malformed conn_id")
    part = raw["part"]
    if part is not None and (not isinstance(part, int) or isinstance(part, bool) or not 0 <= part < MAX_ITEMS):
        raise RayXComReferenceError(bad + "has a malformed part")
    return dict(raw)


def _where(raw: dict[str, Any]) -> str:
    """The row's claimed origin, for messages (unverified: shown as data, cut short)."""
    origin = raw.get("origin")
    if isinstance(origin, dict):
        return "(claims " + ", ".join(f"{k}={str(origin.get(k))[:250]!r}" for k in ("dag_id", "task_id", "run_id",
                                                                                     "map_index")) + ")"
    return "(no origin)"


def _origin(raw: Any, where: str) -> Origin:
    if not isinstance(raw, dict) or set(raw) != _ORIGIN_FIELDS:
        raise RayXComReferenceError(f"Ray XCom reference {where}: 'origin' must hold dag_id, task_id, run_id, "
                                    f"map_index, xcom_key")
    for name in ("dag_id", "task_id", "run_id", "xcom_key"):
        if not isinstance(raw[name], str) or len(raw[name]) > 1000:
            raise RayXComReferenceError(f"Ray XCom reference {where}: origin {name} must be a string")
    return Origin(raw["dag_id"], raw["task_id"], raw["run_id"], _int(raw, "map_index", where, -1, 10**9),
                  raw["xcom_key"])


def _match(raw: dict[str, Any], name: str, pattern: re.Pattern[str], where: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise RayXComReferenceError(f"Ray XCom reference {where}: field {name!r} is missing or malformed: "
                                    f"{str(value)[:100]!r}")
    return value


def _text(raw: dict[str, Any], name: str, where: str) -> str:
    value = raw.get(name, "")
    if not isinstance(value, str) or len(value) > 4096:
        raise RayXComReferenceError(f"Ray XCom reference {where}: field {name!r} must be a string")
    return value


def _int(raw: dict[str, Any], name: str, where: str, low: int, high: int) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RayXComReferenceError(f"Ray XCom reference {where}: field {name!r} must be an integer in "
                                    f"[{low}, {high}], got {value!r}")
    return value
