"""Property tests (hypothesis) over everything parsed from outside the Ray cluster.

For reference rows, manifest bytes and the ids that become checkpoint paths, generated
inputs (arbitrary JSON and mutations of valid, signed ones) must each give either the
valid value or the named error: nothing else raised, nothing unpickled, nothing written
outside the checkpoint root. Each test counts what it tried and prints it (``pytest -s``
shows the lines; the README's reliability section quotes them).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_ray_provider.cluster.checkpoint import TaskCheckpoint, TaskKey, parse_manifest, safe_component
from airflow_ray_provider.config import secret_key
from airflow_ray_provider.exceptions import CheckpointCorrupted, CheckpointError, RayXComReferenceError
from airflow_ray_provider.storage import make_store
from airflow_ray_provider.xcom.backend import SequencePlace, check_place
from airflow_ray_provider.xcom.reference import Location, Origin, RayObject, RayObjectList, parse_reference, signed_json
from tests.dags.trust_dags import Bomb
from tests.support.rows import value_of

EXAMPLES = 400

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value that a mutation can replace."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    out = copy.copy(value)
    out[path[0]] = _replace(value[path[0]], path[1:], new)
    return out


def _valid_reference() -> dict[str, Any]:
    location, origin = Location("ray_default", "airflow", 0), Origin("d", "t", "r", -1)
    items = [RayObject(key=f"d/r/t/-1/1/ab#{i}", location=location, type="int", size=1, summary=str(i),
                       origin=origin, nodes=("ab",),
                       checkpoint={"uri": "/c/d/r/t/-1/result/manifest.json", "sha256": "a" * 64,
                                   "conn_id": None, "part": i}) for i in range(2)]
    return signed_json(RayObjectList(items, location=location, origin=origin))


VALID_REFERENCE = _valid_reference()
tried: dict[str, int] = {}


def _count(name: str) -> None:
    tried[name] = tried.get(name, 0) + 1


@settings(max_examples=EXAMPLES, deadline=None)
@given(json_values)
def test_arbitrary_json_is_never_a_reference(raw: Any) -> None:
    _count("arbitrary JSON as a reference")
    try:
        parse_reference(raw)
    except RayXComReferenceError:
        return
    raise AssertionError(f"accepted {raw!r}")


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_any_mutation_of_a_signed_reference_is_refused(data: st.DataObject) -> None:
    _count("mutated signed references")
    path = data.draw(st.sampled_from(_paths(VALID_REFERENCE)))
    new = data.draw(json_values)
    mutated = _replace(VALID_REFERENCE, path, new)
    # Compared as JSON: in Python True == 1, so a size changed from 1 to true would look unchanged.
    if json.dumps(mutated, sort_keys=True) == json.dumps(VALID_REFERENCE, sort_keys=True):
        assert parse_reference(mutated).to_json() == {k: v for k, v in VALID_REFERENCE.items() if k != "signature"}
        return
    try:
        parse_reference(mutated)
    except RayXComReferenceError:
        return
    raise AssertionError(f"accepted a reference changed at {path!r} to {new!r}")


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(max_size=300))
def test_strings_stay_strings(text: str) -> None:
    _count("strings through deserialize_value")
    for value in (text, json.dumps(VALID_REFERENCE) + text, text + json.dumps(VALID_REFERENCE)):
        assert value_of(value) == value


class _Manifests:
    """One signed checkpoint of a Bomb: loading it (or anything accepted in its place) writes the marker."""

    def __init__(self, root: Path) -> None:
        self.marker = root / "unpickled"
        self.ckpt = TaskCheckpoint(make_store(str(root / "ckpt"), None), TaskKey("d", "r", "t", -1))
        self.ckpt.write_result(Bomb(str(self.marker)))
        self.marker.unlink(missing_ok=True)
        fs, _ = self.ckpt.store.filesystem()
        self.path = self.ckpt.result_uri.split("://", 1)[1]
        self.body = fs.cat_file(self.path)
        self.raw = json.loads(self.body)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutation_of_a_signed_manifest_is_refused_before_unpickling(tmp_path_factory: Any,
                                                                        data: st.DataObject) -> None:
    _count("mutated or arbitrary manifests")
    store = _store(tmp_path_factory)
    kind = data.draw(st.sampled_from(["field", "bytes", "json"]))
    if kind == "field":
        path = data.draw(st.sampled_from(_paths(store.raw)))
        mutated = _replace(store.raw, path, data.draw(json_values))
        if json.dumps(mutated, sort_keys=True) == json.dumps(store.raw, sort_keys=True):
            return
        body = json.dumps(mutated, sort_keys=True).encode()
    elif kind == "bytes":
        body = data.draw(st.binary(max_size=400))
    else:
        body = json.dumps(data.draw(json_values)).encode()
    try:
        parse_manifest(body, "file:///fuzz", store.ckpt.key, secret=secret_key(), slot="result")
    except CheckpointCorrupted:
        pass
    else:
        raise AssertionError(f"accepted manifest {body[:200]!r}")
    fs, _ = store.ckpt.store.filesystem()
    fs.pipe_file(store.path, body)
    try:
        store.ckpt.load_result()
    except CheckpointError:
        pass
    else:
        raise AssertionError("load_result accepted a changed manifest")
    finally:
        fs.pipe_file(store.path, store.body)
    assert not store.marker.exists(), "a pickle was loaded from a changed manifest"


_stores: dict[int, _Manifests] = {}


def _store(factory: Any) -> _Manifests:
    if not _stores:
        _stores[0] = _Manifests(factory.mktemp("manifests"))
    return _stores[0]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.tuples(st.text(max_size=260), st.text(max_size=260), st.text(max_size=260)),
       map_index=st.integers(-1, 10**6))
def test_any_ids_give_folders_inside_the_root(tmp_path_factory: Any, ids: tuple[str, str, str],
                                              map_index: int) -> None:
    _count("dag/run/task ids as checkpoint paths")
    for text in ids:
        segment = safe_component(text)
        assert segment and "/" not in segment and "\x00" not in segment and segment not in (".", "..")
        assert len(segment) <= 200 and segment.isascii()
    base = tmp_path_factory.mktemp("ids")
    root = base / "root"
    ckpt = TaskCheckpoint(make_store(str(root), None), TaskKey(*ids, map_index))
    ckpt.write_result(1)
    assert ckpt.load_result() == 1
    written = [Path(d, f) for d, _, files in os.walk(base) for f in files]
    assert written and all(root in p.parents for p in written), written


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(max_size=120), st.text(max_size=120))
def test_distinct_ids_never_share_a_folder(a: str, b: str) -> None:
    _count("pairs of ids")
    if a != b:
        assert safe_component(a) != safe_component(b)


def _read_whole(map_indexes: list[int]) -> None:
    """Read a mapped output whose rows (in map-index order) hold references of ``map_indexes``, as Airflow does."""
    seen: dict[int, int] = {}
    for offset, index in enumerate(map_indexes):
        ref = RayObject(key=f"d/r/t/{index}/1/ab", location=Location("c", "n", 0), type="int", size=1,
                        summary="1", origin=Origin("d", "t", "r", index))
        check_place(ref, SequencePlace(None, offset, seen))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sets(st.integers(0, 60), min_size=1, max_size=12), st.data())
def test_a_mapped_output_read_whole_refuses_any_row_copied_over_another(indexes: set[int],
                                                                         data: st.DataObject) -> None:
    """Rows with map indexes ``indexes`` (gaps are skipped instances) read whole: genuine, they all read; with
    one row's reference copied over another row's, the read is refused."""
    _count("mapped outputs read whole, genuine and with a copied row")
    rows = sorted(indexes)
    _read_whole(rows)
    if len(rows) < 2:
        return
    source, target = data.draw(st.lists(st.sampled_from(range(len(rows))), min_size=2, max_size=2, unique=True))
    tampered = list(rows)
    tampered[target] = rows[source]
    try:
        _read_whole(tampered)
    except RayXComReferenceError:
        return
    raise AssertionError(f"accepted rows {tampered} (row {target} holds a copy of row {source})")


def test_zz_report_how_many_inputs_were_tried() -> None:
    """Runs last in this file (pytest keeps file order): one line per property with its count."""
    for name, count in sorted(tried.items()):
        print(f"property inputs tried: {count:5d}  {name}")
    assert all(count >= EXAMPLES // 2 for count in tried.values()), tried
