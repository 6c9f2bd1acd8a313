"""Durable task checkpoints on any fsspec store, written by the Ray worker and verified before use.

One folder per task instance; every try of it shares the folder, so a retry finds what
an earlier try wrote::

    <root>/<dag_id>/<run_id>/<task_id>/<map_index>/
        result/manifest.json        the commit point: written last, in one PUT or an atomic rename
        result/<token>-<n>.<ext>    data files, new names per write, so no write touches what a
                                    committed manifest names
        state/<name>/...            progress the callable saves with TaskCheckpoint.save
        tune/                       storage for Ray Tune / Ray Train runs started in the task

A reader reads the manifest, checks its signature (HMAC with the deployment's secret,
which the Airflow side hands to the worker in the :class:`Store`; see ``signing.py``),
then checks each file's sha256 before anything is decoded. Whoever can write to the
bucket but does not hold the secret cannot plant a result or progress that a retry
loads. A partial write has no manifest (or the previous one), so it is never read.
DataFrames go as Parquet, Arrow tables as Arrow IPC, numpy arrays as ``.npy``, other
values as cloudpickle, which is only ever loaded from bytes whose digest matched.

This module runs inside the Ray cluster and must not import Airflow.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_ray_provider.cluster import signing
from airflow_ray_provider.exceptions import CheckpointCorrupted, CheckpointError, CheckpointNotFound

MANIFEST = "manifest.json"
FORMAT = "airflow-ray-checkpoint"
VERSION = 2  # 1 was unsigned; such manifests are refused
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_PARTS = 100_000
_COMPONENT_MAX = 200
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DATA_FILE = re.compile(r"[0-9a-f]{16}-[0-9]{1,6}\.(npy|parquet|arrow|pkl)")
_CODECS = {"npy": "npy", "parquet": "parquet", "arrow": "arrow", "pickle": "pkl"}  # codec -> file extension
_CHUNK = 8 * 1024 * 1024

log = logging.getLogger(__name__)


def safe_component(text: str) -> str:
    """One path segment from a dag, run or task id that cannot leave its folder.

    Letters, digits, ``_`` and ``-`` stay; ``.`` stays unless it leads (so never ``.``
    or ``..``); everything else (``/``, ``:``, ``+``, spaces, non-ASCII) becomes ``~XX``
    per UTF-8 byte. Long ids are cut and suffixed with a digest, so they stay unique.
    """
    out: list[str] = []
    for i, ch in enumerate(text):
        if (ch.isascii() and (ch.isalnum() or ch in "_-")) or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode())
    segment = "".join(out) or "~"
    if len(segment) > _COMPONENT_MAX:
        segment = segment[: _COMPONENT_MAX - 18] + "~~" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return segment


def original_component(segment: str) -> str:
    """The id a :func:`safe_component` segment came from (long, digest-cut ids are shown as stored)."""
    if "~~" in segment:
        return segment
    return re.sub(r"(?:~[0-9A-F]{2})+", lambda m: bytes.fromhex(m.group(0).replace("~", "")).decode(
        errors="replace"), segment)


@dataclass(frozen=True)
class Store:
    """A checkpoint root (``file:///…``, ``s3://bucket/prefix``, ``gs://…``) and the fsspec options to reach it.

    ``storage_options`` may hold credentials and ``secret`` signs and verifies manifests: neither
    is ever part of ``repr`` or a message. Without a secret nothing can be written or read.
    """

    root: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    secret: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root.strip():
            raise CheckpointError(f"Checkpoint root must be a non-empty URL or absolute path, got {self.root!r}")
        if "://" not in self.root and not os.path.isabs(self.root):
            raise CheckpointError(f"Checkpoint root {self.root!r} must be a URL (s3://…, file:///…) or an "
                                  f"absolute path")
        if any(part == ".." for part in self.root.split("://", 1)[-1].split("/")):
            raise CheckpointError(f"Checkpoint root {self.root!r} must not contain '..'")

    def filesystem(self) -> tuple[Any, str]:
        """The fsspec filesystem and the root path inside it.

        ``s3://`` goes through s3fs where it is installed (the Airflow side), else through pyarrow's
        own S3 filesystem (stock Ray images carry pyarrow and fsspec, not s3fs), given the same options.
        """
        from fsspec.core import url_to_fs

        try:
            fs, path = url_to_fs(self.root, **dict(self.storage_options))
        except ImportError as exc:
            if self.root.split("://", 1)[0] not in ("s3", "s3a"):
                raise CheckpointError(f"Cannot open checkpoint root {self.root!r}: {exc}") from exc
            return _arrow_s3(self.storage_options), self.root.split("://", 1)[1].rstrip("/")
        except ValueError as exc:
            raise CheckpointError(f"Cannot open checkpoint root {self.root!r}: {exc}") from exc
        return fs, path.rstrip("/")

    def data_filesystem(self) -> tuple[Any, str]:
        """Where the (large) data files travel: pyarrow's S3 client for ``s3://`` whenever it can take the
        store's options, else ``filesystem()``.

        Its output stream uploads parts in the background while the next is encoded, and its input
        stream is one streamed GET (benchmarks/checkpoint_throughput.py compares both with boto3 and
        with s3fs). Manifests and listings stay on ``filesystem()``; both see the same bucket and keys.
        """
        scheme = self.root.split("://", 1)[0] if "://" in self.root else ""
        options = self.storage_options
        plain = set(options) <= _ARROW_S3_EXACT and set(
            options.get("client_kwargs") or {}) <= {"region_name"}  # nothing pyarrow would drop
        if scheme in ("s3", "s3a") and plain:
            try:
                return _arrow_s3(self.storage_options), self.root.split("://", 1)[1].rstrip("/")
            except ImportError:
                pass
        return self.filesystem()

    def signing_secret(self) -> bytes:
        if not self.secret:
            raise CheckpointError(f"Checkpoint store {self.root!r} has no signing secret, so its manifests can be "
                                  f"neither written nor trusted; build it with storage.make_store()")
        return self.secret

    def url(self, path: str) -> str:
        """A full URL for a path inside this store (for messages and references)."""
        scheme = self.root.split("://", 1)[0] if "://" in self.root else "file"
        return f"{scheme}://{path}"


# The s3fs-style options pyarrow's S3 filesystem can be given (see _arrow_s3).
_ARROW_S3_OPTIONS = frozenset({"key", "secret", "token", "endpoint_url", "client_kwargs", "config_kwargs"})
# Those it also honours: botocore's config_kwargs are accepted on nodes without s3fs but have no pyarrow
# equivalent, so a store that sets them keeps its data files on s3fs where s3fs is installed.
_ARROW_S3_EXACT = _ARROW_S3_OPTIONS - {"config_kwargs"}


def _arrow_s3(options: Mapping[str, Any]) -> Any:
    """pyarrow's S3 filesystem, as fsspec, from s3fs-style options (what ``storage.make_store`` gives)."""
    from fsspec.implementations.arrow import ArrowFSWrapper
    from pyarrow.fs import S3FileSystem

    unknown = sorted(set(options) - _ARROW_S3_OPTIONS)
    if unknown:
        raise CheckpointError(f"s3fs is not installed on this Ray node, and pyarrow's S3 filesystem cannot take "
                              f"the checkpoint storage option(s) {unknown}; install s3fs on the nodes or drop them")
    kwargs: dict[str, Any] = {}
    if options.get("key"):
        kwargs.update(access_key=options["key"], secret_key=options.get("secret"))
        if options.get("token"):
            kwargs["session_token"] = options["token"]
    endpoint = options.get("endpoint_url")
    if endpoint:
        scheme, _, host = str(endpoint).rpartition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    region = (options.get("client_kwargs") or {}).get("region_name")
    if region:
        kwargs["region"] = region
    return ArrowFSWrapper(S3FileSystem(**kwargs))


@dataclass(frozen=True)
class TaskKey:
    """The task instance a checkpoint belongs to (try numbers share it)."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    def segments(self) -> list[str]:
        return [safe_component(self.dag_id), safe_component(self.run_id), safe_component(self.task_id),
                str(int(self.map_index))]

    def as_json(self) -> dict[str, Any]:
        return {"dag_id": self.dag_id, "run_id": self.run_id, "task_id": self.task_id, "map_index": self.map_index}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: what a committed checkpoint holds."""

    sha256: str  # of the manifest bytes, which the XCom reference records
    container: str  # value | dict | list | tuple
    parts: tuple[dict[str, Any], ...]
    fingerprint: str | None
    created: float
    size: int

    def names(self) -> list[str | None]:
        return [p["name"] for p in self.parts]


class TaskCheckpoint:
    """The checkpoint folder of one task instance: its result, saved progress, and Tune storage.

    Inside a ``@task.ray`` callable, :func:`current` returns the task's own::

        ckpt = current()
        state = ckpt.load("progress", default={"epoch": 0})
        for epoch in range(state["epoch"], epochs):
            ...
            ckpt.save("progress", {"epoch": epoch + 1, "weights": weights})
    """

    def __init__(self, store: Store, key: TaskKey) -> None:
        self.store = store
        self.key = key

    def __repr__(self) -> str:
        return f"TaskCheckpoint({self.uri!r})"

    @property
    def uri(self) -> str:
        return self.store.url(self._folder(self.store.filesystem()[1]))

    @property
    def result_uri(self) -> str:
        """The result manifest's URL: what XCom references record."""
        return self.store.url(self._folder(self.store.filesystem()[1], "result", MANIFEST))

    def _folder(self, root: str, *sub: str) -> str:
        return "/".join([root, *self.key.segments(), *sub])

    # -- results ---------------------------------------------------------------------------
    def write_result(self, value: Any, *, fingerprint: str | None = None, split: str | None = None) -> dict[str, Any]:
        """Write a task's return value and commit it; returns what the XCom reference records.

        ``split`` is ``"dict"`` or ``"auto"`` when the result will be split into items
        (``multiple_outputs``, or a list/dict consumed by ``.expand()``): each item is then
        its own file, so restoring one item reads only that file.
        """
        return self._write(("result",), value, fingerprint=fingerprint, split=split)

    def read_manifest(self, expected_sha256: str | None = None) -> Manifest:
        return self._read_manifest(("result",), expected_sha256)

    def load_result(self, manifest: Manifest | None = None, part: int | None = None,
                    expected_sha256: str | None = None) -> Any:
        """The value (or one item, ``part``) of the committed result, digests checked first."""
        manifest = manifest or self.read_manifest(expected_sha256)
        return self._load(("result",), manifest, part)

    # -- progress inside the callable --------------------------------------------------------------
    def save(self, name: str, value: Any) -> str:
        """Durably save ``value`` under ``name`` (replacing the previous save); returns its location."""
        info = self._write(("state", _state_name(name)), value)
        return info["uri"]

    def load(self, name: str, default: Any = None) -> Any:
        """The last value saved under ``name`` by any try of this task, or ``default``."""
        sub = ("state", _state_name(name))
        try:
            manifest = self._read_manifest(sub, None)
        except CheckpointNotFound:
            return default
        return self._load(sub, manifest, None)

    def tune_storage(self) -> tuple[str, Any]:
        """``(storage_path, storage_filesystem)`` for ``ray.tune.RunConfig`` / ``ray.train.RunConfig``.

        Experiments stored there survive the Ray cluster, so a retried task can
        ``Tuner.restore`` them. The filesystem is pyarrow's view of the same fsspec store.
        """
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, root = self.store.filesystem()
        path = self._folder(root, "tune")
        fs.makedirs(path, exist_ok=True)
        return path, PyFileSystem(FSSpecHandler(fs))

    # -- the machinery -------------------------------------------------------------------------
    def _write(self, sub: tuple[str, ...], value: Any, *, fingerprint: str | None = None,
               split: str | None = None) -> dict[str, Any]:
        secret = self.store.signing_secret()
        fs, root = self.store.filesystem()
        data_fs, _ = self.store.data_filesystem()
        folder = self._folder(root, *sub)
        container, names, items = _split(value, split)
        token = uuid.uuid4().hex[:16]
        started = time.monotonic()
        parts: list[dict[str, Any]] = []
        try:
            fs.makedirs(folder, exist_ok=True)
            for n, (name, item) in enumerate(zip(names, items, strict=True)):
                codec, writer = _encoder(item)
                file_name = f"{token}-{n}.{_CODECS[codec]}"
                digest, size = _put(data_fs, f"{folder}/{file_name}", writer)
                parts.append({"name": name, "file": file_name, "codec": codec, "type": _type_name(item),
                              "size": size, "sha256": digest})
            # "slot" binds the manifest to its folder: a signed result manifest copied over a progress
            # save (or the reverse) is refused like a forged one.
            fields = {"format": FORMAT, "version": VERSION, "created": time.time(), "task": self.key.as_json(),
                      "slot": "/".join(sub), "fingerprint": fingerprint, "container": container, "parts": parts}
            fields["signature"] = signing.sign(secret, signing.MANIFEST, fields)
            body = json.dumps(fields, sort_keys=True).encode()
            _commit(fs, f"{folder}/{MANIFEST}", body)
        except Exception as exc:
            # This write's files (a partial one among them) would fill the store for every other task on it,
            # and a retry would add its own: they go, best effort; earlier checkpoints are left alone.
            _remove_files(data_fs, folder, lambda name: name.startswith(f"{token}-"))
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"Writing the checkpoint to {self.store.url(folder)} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        _remove_stale(fs, folder, {p["file"] for p in parts})
        return {"uri": self.store.url(f"{folder}/{MANIFEST}"), "sha256": hashlib.sha256(body).hexdigest(),
                "size": sum(p["size"] for p in parts), "seconds": time.monotonic() - started}

    def _read_manifest(self, sub: tuple[str, ...], expected_sha256: str | None) -> Manifest:
        fs, root = self.store.filesystem()
        path = f"{self._folder(root, *sub)}/{MANIFEST}"
        url = self.store.url(path)
        try:
            size = fs.size(path)
            body = fs.cat_file(path) if size is not None and size <= MAX_MANIFEST_BYTES else None
        except FileNotFoundError:
            raise CheckpointNotFound(f"No checkpoint at {url}") from None
        except Exception as exc:
            raise CheckpointError(f"Cannot read the checkpoint at {url}: {type(exc).__name__}: {exc}") from exc
        if body is None:
            raise CheckpointCorrupted(f"Checkpoint manifest {url} is {size} bytes; refusing to read it")
        return parse_manifest(body, url, self.key, expected_sha256, secret=self.store.signing_secret(),
                              slot="/".join(sub))

    def _load(self, sub: tuple[str, ...], manifest: Manifest, part: int | None) -> Any:
        fs, root = self.store.data_filesystem()
        folder = self._folder(root, *sub)
        indexes = range(len(manifest.parts)) if part is None else [part]
        if part is not None and not 0 <= part < len(manifest.parts):
            raise CheckpointCorrupted(f"Checkpoint {self.store.url(folder)} has no item {part}")
        values = [_get(fs, f"{folder}/{manifest.parts[i]['file']}", manifest.parts[i], self.store) for i in indexes]
        if part is not None or manifest.container == "value":
            return values[0]
        if manifest.container == "dict":
            return dict(zip(manifest.names(), values, strict=True))
        return tuple(values) if manifest.container == "tuple" else values


def restore_result(checkpoint: TaskCheckpoint, part: int | None, sha256: str | None) -> Any:
    """Run in a Ray worker (by the owner actor) to put a lost upstream result back into the object store."""
    print(f"Restoring {'item ' + str(part) + ' of ' if part is not None else ''}the result of task "
          f"{checkpoint.key.task_id!r} from its checkpoint {checkpoint.uri}")
    return checkpoint.load_result(part=part, expected_sha256=sha256)


def parse_manifest(body: bytes, url: str, key: TaskKey | None = None, expected_sha256: str | None = None, *,
                   secret: bytes, slot: str | None = None) -> Manifest:
    """Verify and validate manifest bytes read from storage; raise :class:`CheckpointCorrupted` naming the problem.

    No digest is ever put in a message: one that echoed the real digest would hand a forger
    the value to write into the next forged reference.
    """
    digest = hashlib.sha256(body).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointCorrupted(f"Checkpoint manifest {url} does not match the digest its XCom reference "
                                  f"recorded: it was changed after the task wrote it. Nothing was loaded")
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise CheckpointCorrupted(f"Checkpoint manifest {url} is not valid JSON: {exc}") from None
    fields = {"format", "version", "created", "task", "slot", "fingerprint", "container", "parts", "signature"}
    if not isinstance(raw, dict) or set(raw) != fields:
        raise CheckpointCorrupted(f"Checkpoint manifest {url} must have exactly the fields {sorted(fields)} "
                                  f"(version {VERSION}; unsigned manifests of version 1 are not read)")
    if raw["format"] != FORMAT or raw["version"] != VERSION:
        raise CheckpointCorrupted(f"Checkpoint manifest {url}: unsupported format {str(raw['format'])[:50]!r} "
                                  f"version {str(raw['version'])[:20]!r}")
    if slot is not None and raw["slot"] != slot:
        raise CheckpointCorrupted(f"Checkpoint manifest {url} was written for {str(raw['slot'])[:200]!r}, not {slot!r}")
    if key is not None and raw["task"] != key.as_json():
        raise CheckpointCorrupted(f"Checkpoint manifest {url} belongs to {raw['task']!r}, not {key.as_json()!r}")
    if raw["fingerprint"] is not None and not (isinstance(raw["fingerprint"], str)
                                               and _HEX64.fullmatch(raw["fingerprint"])):
        raise CheckpointCorrupted(f"Checkpoint manifest {url}: 'fingerprint' must be a sha256 hex digest")
    if raw["container"] not in ("value", "dict", "list", "tuple"):
        raise CheckpointCorrupted(f"Checkpoint manifest {url}: unknown container {raw['container']!r}")
    if not isinstance(raw["created"], (int, float)) or isinstance(raw["created"], bool):
        raise CheckpointCorrupted(f"Checkpoint manifest {url}: 'created' must be a number")
    parts = raw["parts"]
    if not isinstance(parts, list) or not 0 < len(parts) <= MAX_PARTS or (
            raw["container"] == "value" and len(parts) != 1):
        raise CheckpointCorrupted(f"Checkpoint manifest {url}: 'parts' must be a non-empty list "
                                  f"(one part for a single value)")
    for i, part in enumerate(parts):
        _check_part(part, i, raw["container"], url)
    # Last, so a malformed manifest says what is malformed; before anything is returned or loaded.
    if not signing.verify(secret, signing.MANIFEST, {k: v for k, v in raw.items() if k != "signature"},
                          raw["signature"]):
        raise CheckpointCorrupted(f"Checkpoint manifest {url} is not signed with this deployment's [ray] secret_key "
                                  f"(planted or edited in the store, or written by another deployment); nothing "
                                  f"from it was loaded")
    return Manifest(sha256=digest, container=raw["container"], parts=tuple(parts), fingerprint=raw["fingerprint"],
                    created=float(raw["created"]), size=sum(p["size"] for p in parts))


def _check_part(part: Any, i: int, container: str, url: str) -> None:
    where = f"Checkpoint manifest {url}, part {i}"
    if not isinstance(part, dict) or set(part) != {"name", "file", "codec", "type", "size", "sha256"}:
        raise CheckpointCorrupted(f"{where}: must hold name, file, codec, type, size, sha256")
    if not isinstance(part["file"], str) or not _DATA_FILE.fullmatch(part["file"]):
        raise CheckpointCorrupted(f"{where}: malformed file name {str(part['file'])[:100]!r}")
    if (not isinstance(part["codec"], str) or part["codec"] not in _CODECS
            or not part["file"].endswith("." + _CODECS[part["codec"]])):
        raise CheckpointCorrupted(f"{where}: unknown codec {part['codec']!r}")
    if not isinstance(part["sha256"], str) or not _HEX64.fullmatch(part["sha256"]):
        raise CheckpointCorrupted(f"{where}: 'sha256' must be a hex digest")
    size = part["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CheckpointCorrupted(f"{where}: 'size' must be a non-negative integer")
    name = part["name"]
    if (container == "dict" and not isinstance(name, str)) or (container != "dict" and name is not None):
        raise CheckpointCorrupted(f"{where}: 'name' does not fit container {container!r}")
    if not isinstance(part["type"], str) or len(part["type"]) > 500:
        raise CheckpointCorrupted(f"{where}: 'type' must be a short string")


# -- the current task's checkpoint (set by the worker while the callable runs) -----------------------
_current: contextvars.ContextVar[TaskCheckpoint | None] = contextvars.ContextVar("airflow_ray_checkpoint",
                                                                                 default=None)


def current() -> TaskCheckpoint:
    """The checkpoint folder of the ``@task.ray`` task whose callable is running here."""
    found = _current.get()
    if found is None:
        raise RuntimeError("airflow_ray_provider.cluster.checkpoint.current() works only inside a @task.ray callable")
    return found


@contextlib.contextmanager
def bound(checkpoint: TaskCheckpoint | None) -> Iterator[None]:
    token = _current.set(checkpoint)
    try:
        yield
    finally:
        _current.reset(token)


# -- encoding ---------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"[:500]


def _split(value: Any, split: str | None) -> tuple[str, list[str | None], list[Any]]:
    """Items as separate parts, the same way the owner actor splits them (so part ``i`` is item ``i``)."""
    if split is None or not isinstance(value, (dict, list, tuple)) or not 0 < len(value) <= MAX_PARTS:
        return "value", [None], [value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return "dict", list(value), list(value.values())
    if split == "auto" and isinstance(value, (list, tuple)):
        return type(value).__name__, [None] * len(value), list(value)
    return "value", [None], [value]


def _encoder(value: Any) -> tuple[str, Any]:
    """``(codec, write(fileobj))`` for a value: columnar and array formats where they fit."""
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            return "npy", lambda f: _write_npy(f, value)
    if module == "pandas":
        import pandas as pd

        if isinstance(value, pd.DataFrame):
            table = _arrow_table(value)
            if table is not None:
                import pyarrow.parquet as pq

                return "parquet", lambda f: pq.write_table(table, f)
    if module == "pyarrow":
        import pyarrow as pa

        if isinstance(value, pa.Table):
            def write_arrow(f: Any) -> None:
                with pa.ipc.new_file(f, value.schema) as writer:
                    writer.write_table(value)

            return "arrow", write_arrow
    from ray import cloudpickle

    return "pickle", lambda f: cloudpickle.dump(value, f, protocol=5)


def _write_npy(f: Any, array: Any) -> None:
    """``np.save``, but a contiguous array's memory goes out in large slices, not re-chunked copies."""
    import numpy as np

    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        np.save(f, array, allow_pickle=False)
        return
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
    data = memoryview(array.reshape(-1, order="F" if array.flags.f_contiguous and not array.flags.c_contiguous
                                    else "C")).cast("B")
    for start in range(0, data.nbytes, 4 * _CHUNK):
        f.write(data[start:start + 4 * _CHUNK])


def _arrow_table(frame: Any) -> Any:
    """The DataFrame as an Arrow table if its column and index types survive Parquet, else ``None`` (pickled)."""
    import pyarrow as pa

    try:
        back = pa.Table.from_pandas(frame.head(100)).to_pandas()
        if not (back.dtypes.equals(frame.dtypes) and back.columns.equals(frame.columns)
                and type(back.index) is type(frame.index)):
            return None
        return pa.Table.from_pandas(frame)
    except (pa.ArrowException, TypeError, ValueError):
        return None


def _decode(codec: str, body: Any) -> Any:
    """The value from its verified bytes (a ``bytearray``), without copying them where the format allows."""
    if codec == "pickle":
        from ray import cloudpickle

        return cloudpickle.loads(body)
    if codec == "npy":
        return _npy_view(body)
    import pyarrow as pa

    if codec == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(pa.BufferReader(pa.py_buffer(body))).to_pandas()
    if codec == "arrow":
        return pa.ipc.open_file(pa.BufferReader(pa.py_buffer(body))).read_all()
    raise CheckpointCorrupted(f"unknown codec {codec!r}")


def _npy_view(body: bytearray) -> Any:
    """``np.load`` of an ``.npy`` held in memory, as an array over those bytes (writable, like np.load's)."""
    import numpy as np

    header = io.BytesIO(memoryview(body)[:65536 + 16])
    version = np.lib.format.read_magic(header)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(header)
    if dtype.hasobject:
        raise CheckpointCorrupted("the .npy file holds Python objects, which are never unpickled")
    count = 1
    for n in shape:
        count *= n
    offset = header.tell()
    if offset + count * dtype.itemsize != len(body):
        raise CheckpointCorrupted(f"the .npy header says {count * dtype.itemsize} data bytes, the file has "
                                  f"{len(body) - offset}")
    return np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape,
                                                                                 order="F" if fortran else "C")


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``inner``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self._inner.write(view)
        self.size += view.nbytes
        return view.nbytes


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _put(fs: Any, path: str, writer: Any) -> tuple[str, int]:
    """Encode straight into the destination, hashing on the way: no temporary copy on disk or in memory.

    On S3 the output stream uploads each full part as it fills: through pyarrow's filesystem (see
    ``Store.data_filesystem``) in the background while the next one is encoded and hashed; through
    s3fs (a store with an s3fs-only option) in 16 MiB parts.
    """
    if _is_local(fs):
        return _encode_to(open(path, "wb"), writer)  # _encode_to closes it
    return _encode_to(fs.open(path, "wb", **_transfer_options(fs)), writer)


def _encode_to(raw: Any, writer: Any) -> tuple[str, int]:
    """Run ``writer`` into the binary file ``raw`` (closed here); returns the sha256 and size of what it wrote.

    If ``writer`` fails, s3fs's upload is abandoned (``discard`` aborts the multipart upload) rather than
    completed with what was sent so far. pyarrow's stream cannot be abandoned from Python: closing it
    completes the object, which the failed write then deletes with its other files (``TaskCheckpoint._write``).
    """
    try:
        with io.BufferedWriter(_HashingFile(raw), _CHUNK) as out:
            writer(out)
            out.flush()
            digest, size = out.raw.sha256.hexdigest(), out.raw.size
    except BaseException:
        if callable(getattr(raw, "discard", None)):
            with contextlib.suppress(Exception):
                raw.discard()
        with contextlib.suppress(Exception):
            raw.close()
        raise
    raw.close()  # completes the file: an error here (a full disk, a refused upload) is the write's error
    return digest, size


def _transfer_options(fs: Any) -> dict[str, Any]:
    """Part size for s3fs's uploads and reads (its default is 50 MiB, read ahead); others take their own."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return {"block_size": _CHUNK * 2} if "s3" in protocols and not _is_arrow(fs) else {}


def _is_arrow(fs: Any) -> bool:
    return type(fs).__name__ == "ArrowFSWrapper"


def _commit(fs: Any, path: str, body: bytes) -> None:
    """Make the manifest visible all at once: an atomic rename locally, a single PUT on object stores."""
    if _is_local(fs):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, body)


def _remove_stale(fs: Any, folder: str, keep: set[str]) -> None:
    """Delete data files of earlier writes that the new manifest no longer names (best effort)."""
    _remove_files(fs, folder, lambda name: name not in keep)


def _remove_files(fs: Any, folder: str, chosen: Callable[[str], bool]) -> None:
    """Delete the data files in ``folder`` whose names are ``chosen`` (best effort).

    A failure costs only storage (no manifest names these files, so they are never read), so it is
    logged, not raised.
    """
    try:
        for entry in fs.ls(folder, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if _DATA_FILE.fullmatch(name) and chosen(name):
                fs.rm_file(entry)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("Could not remove checkpoint files in %s: %s: %s", folder, type(exc).__name__, exc)


def _fetch(fs: Any, path: str, expected_size: int) -> tuple[bytearray, str]:
    """Read a whole data file into memory in one stream, hashing each slice while the next one arrives.

    One sequential stream reads as fast as boto3's parallel download here (SeaweedFS on loopback,
    benchmarks/checkpoint_throughput.py), and it makes no copy on disk: what is hashed is what is decoded.
    Reads a byte past ``expected_size`` so that a longer file is noticed, not silently cut.
    """
    from concurrent.futures import ThreadPoolExecutor

    body = bytearray(expected_size)
    view = memoryview(body)
    digest = hashlib.sha256()
    if _is_local(fs):
        source = open(path, "rb", buffering=0)  # closed below
    elif _is_arrow(fs):
        source = fs.open(path, "rb", seekable=False)  # one GET, streamed
    else:
        source = fs.open(path, "rb", cache_type="none", **_transfer_options(fs))
    size = 0
    with source, ThreadPoolExecutor(1, thread_name_prefix="airflow-ray-ckpt-hash") as hasher:
        hashing = None
        while size < expected_size:
            n = source.readinto(view[size:size + 2 * _CHUNK])
            if not n:
                break
            if hashing is not None:
                hashing.result()
            hashing = hasher.submit(digest.update, view[size:size + n])  # hashlib lets the GIL go
            size += n
        if hashing is not None:
            hashing.result()
        longer = size == expected_size and bool(source.read(1))
    if size != expected_size or longer:
        raise CheckpointCorrupted(f"{'more than ' if longer else ''}{size} bytes, expected {expected_size}")
    return body, digest.hexdigest()


def _get(fs: Any, path: str, part: dict[str, Any], store: Store) -> Any:
    url = store.url(path)
    try:
        try:
            body, digest = _fetch(fs, path, int(part["size"]))
        except CheckpointCorrupted as exc:
            raise CheckpointCorrupted(f"Checkpoint file {url} does not match its manifest ({exc}). It was "
                                      f"corrupted or tampered with; it was not loaded") from None
        if digest != part["sha256"]:
            raise CheckpointCorrupted(f"Checkpoint file {url} does not match its manifest (its sha256 differs). "
                                      f"It was corrupted or tampered with; it was not loaded")
        return _decode(part["codec"], body)  # the very bytes that were hashed: nothing can change in between
    except FileNotFoundError:
        raise CheckpointCorrupted(f"Checkpoint file {url}, named by its manifest, is missing") from None
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"Cannot read the checkpoint file {url}: {type(exc).__name__}: {exc}") from exc


def _state_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", name) or name.startswith("."):
        raise ValueError(f"Checkpoint state name must be 1-100 letters, digits, '_', '-' or '.', not leading '.'; "
                         f"got {name!r}")
    return name


# -- listing and cleanup (used by the CLI through the Airflow side) ----------------------------------
def list_runs(store: Store, dag_id: str | None = None) -> list[dict[str, Any]]:
    """One row per checkpointed task instance: dag, run, task, map index, bytes, newest write time."""
    fs, root = store.filesystem()
    depth = 4
    base = root if dag_id is None else f"{root}/{safe_component(dag_id)}"
    rows: dict[str, dict[str, Any]] = {}
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return []
    for path, info in found.items():
        rel = path[len(root):].strip("/").split("/")
        if len(rel) <= depth:
            continue
        folder = "/".join(rel[:depth])
        row = rows.setdefault(folder, {"dag": original_component(rel[0]), "run": original_component(rel[1]),
                                       "task": original_component(rel[2]), "map_index": rel[3],
                                       "bytes": 0, "modified": 0.0, "path": f"{root}/{folder}",
                                       "uri": store.url(f"{root}/{folder}")})
        row["bytes"] += int(info.get("size") or 0)
        row["modified"] = max(row["modified"], _mtime(info))
    return sorted(rows.values(), key=lambda r: (r["dag"], r["run"], r["task"], r["map_index"]))


def delete_run(store: Store, dag_id: str, run_id: str) -> int:
    """Delete every checkpoint of one DAG run; returns how many task folders went."""
    fs, root = store.filesystem()
    folder = f"{root}/{safe_component(dag_id)}/{safe_component(run_id)}"
    if not fs.exists(folder):
        return 0
    count = len(fs.ls(folder, detail=False))
    fs.rm(folder, recursive=True)
    return count


def prune(store: Store, older_than_s: float, dry_run: bool = False) -> list[dict[str, Any]]:
    """Delete task folders not written to for ``older_than_s`` seconds; returns them."""
    fs, root = store.filesystem()
    cutoff = time.time() - older_than_s
    old = [row for row in list_runs(store) if row["modified"] < cutoff]
    if not dry_run:
        for row in old:
            fs.rm(row["path"], recursive=True)
            if _is_local(fs):  # object stores have no folders; local ones would keep empty dag/run folders
                parent = os.path.dirname(row["path"])
                while parent.startswith(root + "/"):
                    with contextlib.suppress(OSError):
                        os.rmdir(parent)
                    parent = os.path.dirname(parent)
    return old


def _mtime(info: Mapping[str, Any]) -> float:
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        with contextlib.suppress(ValueError):
            from datetime import datetime

            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return 0.0


@dataclass(frozen=True)
class CheckpointJob:
    """What a ``checkpoint=True`` task asks of its worker: write the result, or reuse a matching one. Sent with the
    call (pickled), so it lives here, without Ray, for processes that reach the cluster through the gateway."""

    checkpoint: TaskCheckpoint
    fingerprint: str  # of the callable and its inputs; a checkpoint is reused only for the same one
    write: bool = True
    reuse: bool = True
    split: str | None = None  # "dict" / "auto": store items as separate files (see TaskCheckpoint.write_result)
