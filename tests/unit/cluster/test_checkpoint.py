"""The checkpoint store on local files (``file://``): formats, integrity, partial writes, paths.

The same tests run against a real S3 server in tests/integration/cluster/test_checkpoint_s3.py, which
imports them and gives them an S3 ``store``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from airflow_ray_provider.cluster.checkpoint import Store, TaskCheckpoint, TaskKey, safe_component
from airflow_ray_provider.exceptions import CheckpointCorrupted, CheckpointError, CheckpointNotFound
from airflow_ray_provider.storage import checkpoint_of, make_store


def test_keys_cannot_escape_the_checkpoint_root(tmp_path: Path) -> None:
    store = make_store(str(tmp_path / "root"), None)
    hostile = ["..", "../../etc", "a/../../b", "/abs", ".hidden", "x\x00y", "sp ace:+", "é", "", "a" * 500]
    seen = set()
    for text in hostile:
        segment = safe_component(text)
        assert "/" not in segment and segment not in (".", "..") and not segment.startswith(".")
        assert len(segment) <= 200
        seen.add(segment)
        ckpt = TaskCheckpoint(store, TaskKey(text or "x", text or "y", text or "z", 0))
        ckpt.write_result([text])
        assert ckpt.load_result() == [text]
    assert len(seen) == len(hostile)  # distinct ids never share a folder
    root = (tmp_path / "root").resolve()
    for path in tmp_path.rglob("*"):
        assert path.resolve().is_relative_to(root) or path.resolve() == root.parent, path
    with pytest.raises(CheckpointError, match=r"'\.\.'"):
        make_store(f"{tmp_path}/a/../b", None)
    with pytest.raises(CheckpointError, match="absolute path"):
        make_store("relative/path", None)


RUN_ID = "manual__2026-11-24T05:00:00+00:00"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return make_store(f"file://{tmp_path}/ckpt", None)


def task_checkpoint(store: Store, task_id: str = "produce", map_index: int = -1) -> TaskCheckpoint:
    return TaskCheckpoint(store, TaskKey("unit_dag", RUN_ID, task_id, map_index))


class Bomb:
    """Unpickling this creates a file: proof that a refused checkpoint was never unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def flip_byte(checkpoint: TaskCheckpoint, suffix: str) -> None:
    fs, _ = checkpoint.store.filesystem()
    folder = checkpoint.result_uri.split("://", 1)[1].rsplit("/", 1)[0]
    (path,) = [p for p in fs.ls(folder, detail=False) if p.endswith(suffix)]
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(path, bytes(data))


def test_values_round_trip_in_their_columnar_and_array_formats(store: Store) -> None:
    ckpt = task_checkpoint(store)
    frame = pd.DataFrame({"x": np.arange(50), "y": np.linspace(0, 1, 50), "tag": ["a", "b"] * 25})
    cases = [
        (np.arange(1000, dtype=np.float32).reshape(10, 100), "npy"),
        (frame, "parquet"),
        (pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), "arrow"),
        ({"nested": [1, {"two": 2}], "when": "2026"}, "pickle"),
        (np.array([{"object": 1}], dtype=object), "pickle"),  # object arrays are never .npy-pickled
    ]
    for value, codec in cases:
        info = ckpt.write_result(value)
        manifest = ckpt.read_manifest(info["sha256"])
        assert manifest.parts[0]["codec"] == codec
        back = ckpt.load_result(expected_sha256=info["sha256"])
        if isinstance(value, np.ndarray) and codec == "npy":
            np.testing.assert_array_equal(back, value)
            assert back.dtype == value.dtype
        elif isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(back, value)
        elif isinstance(value, pa.Table):
            assert back.equals(value)
        elif isinstance(value, np.ndarray):
            assert back.tolist() == value.tolist()
        else:
            assert back == value
        assert info["uri"].startswith(store.root.split("://")[0] if "://" in store.root else "file://")


def test_split_results_store_each_item_so_one_item_loads_alone(store: Store) -> None:
    ckpt = task_checkpoint(store)
    value = {"frame": pd.DataFrame({"a": [1, 2]}), "array": np.arange(4), "meta": {"k": "v"}}
    ckpt.write_result(value, split="dict")
    manifest = ckpt.read_manifest()
    assert manifest.container == "dict" and [p["codec"] for p in manifest.parts] == ["parquet", "npy", "pickle"]
    np.testing.assert_array_equal(ckpt.load_result(part=1), np.arange(4))
    whole = ckpt.load_result()
    assert list(whole) == ["frame", "array", "meta"] and whole["meta"] == {"k": "v"}
    ckpt.write_result((1, "two"), split="auto")
    assert ckpt.load_result() == (1, "two") and ckpt.load_result(part=1) == "two"


def test_a_flipped_byte_is_refused_and_never_unpickled(store: Store, tmp_path: Path) -> None:
    ckpt = task_checkpoint(store)
    marker = tmp_path / "unpickled"
    ckpt.write_result({"payload": Bomb(str(marker)), "pad": "x" * 1000})
    marker.unlink(missing_ok=True)  # the writer's own check of the pickle does not count
    flip_byte(ckpt, ".pkl")
    with pytest.raises(CheckpointCorrupted, match="does not match its manifest") as err:
        ckpt.load_result()
    assert ".pkl" in str(err.value) and "not loaded" in str(err.value)
    assert not marker.exists()

    ckpt.write_result(np.arange(10_000.0))
    flip_byte(ckpt, ".npy")
    with pytest.raises(CheckpointCorrupted, match="sha256"):
        ckpt.load_result()


@pytest.mark.parametrize("change", ["shorter", "longer"])
def test_a_data_file_of_another_length_is_refused(store: Store, change: str) -> None:
    ckpt = task_checkpoint(store)
    ckpt.write_result(np.arange(100_000.0))
    fs, _ = store.filesystem()
    folder = ckpt.result_uri.split("://", 1)[1].rsplit("/", 1)[0]
    (path,) = [p for p in fs.ls(folder, detail=False) if p.endswith(".npy")]
    data = fs.cat_file(path)
    fs.pipe_file(path, data[:-8] if change == "shorter" else data + b"\0" * 8)
    with pytest.raises(CheckpointCorrupted, match="does not match its manifest") as err:
        ckpt.load_result()
    assert ("more than " if change == "longer" else f"{len(data) - 8} bytes") in str(err.value)
    assert "not loaded" in str(err.value)


def test_restored_arrays_keep_their_layout_and_stay_writable(store: Store) -> None:
    ckpt = task_checkpoint(store)
    for value in (np.arange(24.0).reshape(2, 3, 4), np.asfortranarray(np.arange(12).reshape(3, 4)),
                  np.array([], dtype=np.int16), np.full((), 2.5, dtype=np.float32), np.arange(10)[::2]):
        ckpt.write_result(value)
        back = ckpt.load_result()
        assert back.dtype == value.dtype and back.shape == value.shape and np.array_equal(back, value)
        if value.ndim >= 2 and value.flags.f_contiguous and not value.flags.c_contiguous:
            assert back.flags.f_contiguous
        back[...] = 0  # like np.load's result, not a read-only view of someone else's memory


def test_a_manifest_changed_after_the_reference_was_written_is_refused(store: Store) -> None:
    ckpt = task_checkpoint(store)
    info = ckpt.write_result([1, 2, 3])
    fs, _ = store.filesystem()
    path = info["uri"].split("://", 1)[1]
    raw = json.loads(fs.cat_file(path))
    raw["created"] += 1
    fs.pipe_file(path, json.dumps(raw).encode())
    with pytest.raises(CheckpointCorrupted, match="changed after the task wrote it"):
        ckpt.load_result(expected_sha256=info["sha256"])
    escaping = [{**raw["parts"][0], "file": "../../x.pkl"}]
    for field, bad, message in (("parts", escaping, "malformed file name"), ("task", {"dag_id": "other"}, "belongs to"),
                                ("version", 9, "unsupported"), ("extra", 1, "exactly the fields")):
        forged = {**raw, field: bad}
        fs.pipe_file(path, json.dumps(forged).encode())
        with pytest.raises(CheckpointCorrupted, match=message):
            ckpt.read_manifest()


def test_a_partial_write_is_never_read(store: Store) -> None:
    """Data files without a committed manifest are invisible; an older committed result stays readable."""
    ckpt = task_checkpoint(store)
    fs, _ = store.filesystem()
    folder = ckpt.result_uri.split("://", 1)[1].rsplit("/", 1)[0]
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(f"{folder}/0123456789abcdef-0.npy", b"\x93NUMPY half-written")
    with pytest.raises(CheckpointNotFound):
        ckpt.load_result()
    info = ckpt.write_result("first")
    fs.pipe_file(f"{folder}/fedcba9876543210-0.pkl", b"\x80\x05 half-written")  # a second write, cut off
    assert ckpt.load_result(expected_sha256=info["sha256"]) == "first"


def test_a_failed_write_leaves_no_files_and_the_last_result_intact(store: Store) -> None:
    """A write that fails midway (here: an item that cannot be pickled, after 4 MB were written) removes its own
    files, the partial one among them, so a full store is not left full; the committed result stays."""
    ckpt = task_checkpoint(store)
    info = ckpt.write_result("first")
    fs, _ = store.filesystem()
    folder = ckpt.result_uri.split("://", 1)[1].rsplit("/", 1)[0]
    files_before = sorted(fs.ls(folder, detail=False))
    for _ in range(2):  # a retry fails the same way and leaves nothing either
        with pytest.raises(CheckpointError, match=r"Writing the checkpoint to .* failed: TypeError: cannot pickle"):
            ckpt.write_result(["x" * 4_000_000, threading.Lock()])
        assert sorted(fs.ls(folder, detail=False)) == files_before
    assert ckpt.load_result(expected_sha256=info["sha256"]) == "first"


def test_progress_save_and_load(store: Store) -> None:
    ckpt = task_checkpoint(store, "train")
    assert ckpt.load("progress", default={"epoch": 0}) == {"epoch": 0}
    ckpt.save("progress", {"epoch": 3, "weights": np.ones(3)})
    again = task_checkpoint(store, "train")  # a retry builds its own
    state = again.load("progress")
    assert state["epoch"] == 3 and state["weights"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="state name"):
        ckpt.save("../escape", 1)


def test_reference_locations_must_match_their_task(store: Store) -> None:
    ckpt = task_checkpoint(store)
    info = ckpt.write_result(42)
    ref = {"uri": info["uri"], "sha256": info["sha256"], "conn_id": "ckpt_s3" if "s3" in info["uri"] else None,
           "part": None}
    assert checkpoint_of(ref, "unit_dag", RUN_ID, "produce", -1).load_result(expected_sha256=info["sha256"]) == 42
    with pytest.raises(CheckpointError, match="does not match the task"):
        checkpoint_of(ref, "unit_dag", RUN_ID, "other_task", -1)
    suffix = ref["uri"][ref["uri"].index("/unit_dag/"):]
    with pytest.raises(CheckpointError, match="protocol 'http'"):
        checkpoint_of({**ref, "uri": "http://elsewhere.invalid" + suffix}, "unit_dag", RUN_ID, "produce", -1)


def test_tune_storage_is_a_pyarrow_view_of_the_same_store(store: Store) -> None:
    """Ray Tune / Train get ``storage_path`` + ``storage_filesystem`` inside the task's checkpoint folder."""
    ckpt = task_checkpoint(store, "search")
    path, filesystem = ckpt.tune_storage()
    assert path.endswith("/unit_dag/manual__2026-11-24T05~3A00~3A00~2B00~3A00/search/-1/tune")
    with filesystem.open_output_stream(f"{path}/experiment_state.json") as out:
        out.write(b'{"trials": 3}')
    fs, _ = store.filesystem()
    assert fs.cat_file(f"{path}/experiment_state.json") == b'{"trials": 3}'
