"""What runs inside the Ray worker: unpickle the callable, capture its output, call it.

Everything the callable writes to stdout and stderr (``print``, ``logging``, native libraries,
child processes: captured at the file-descriptor level) is copied (not moved: Ray's own worker
log files still get it) to the owner actor in small batches, where the waiting Airflow task
picks it up for its task log.

This module runs inside the Ray cluster and must not import Airflow.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import inspect
import io
import logging
import os
import pickle
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
import ray.actor
from ray import cloudpickle

from airflow_ray_provider.cluster import checkpoint as ckpt
from airflow_ray_provider.cluster import ray_compat
from airflow_ray_provider.cluster.checkpoint import CheckpointJob
from airflow_ray_provider.cluster.describe import describe
from airflow_ray_provider.cluster.gateway_api import CallEnvelope, HeldInput, map_nested
from airflow_ray_provider.exceptions import UpstreamObjectLost

_FLUSH_INTERVAL_S = 0.2
MAX_SPLIT_ITEMS = 100_000  # more than Airflow's max_map_length allows


class UpstreamRef:
    """An upstream task's object, passed by reference; ``label`` names it in errors.

    ``checkpoint`` (the upstream's checkpoint, item index and manifest digest) lets the
    worker restore the value itself when the object was lost after it was handed over.
    """

    __slots__ = ("checkpoint", "label", "ref")

    def __init__(self, ref: ray.ObjectRef, label: str,
                 checkpoint: tuple[ckpt.TaskCheckpoint, int | None, str] | None = None) -> None:
        self.ref = ref
        self.label = label
        self.checkpoint = checkpoint

    def __reduce__(self) -> tuple[Any, ...]:
        return (UpstreamRef, (self.ref, self.label, self.checkpoint))


class _LogSink:
    """Buffers text and ships it to the owner actor from a background thread."""

    def __init__(self, owner: Any, key: str) -> None:
        self._owner = owner
        self._key = key
        self._lock = threading.Lock()
        self._buffer: list[str] = []
        self._partial = ""
        self._events: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="airflow-ray-log-sink", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def write(self, text: str) -> None:
        with self._lock:
            text = self._partial + text
            head, sep, self._partial = text.rpartition("\n")
            if sep:
                self._buffer.append(head + "\n")

    def event(self, **events: Any) -> None:
        with self._lock:
            self._events.update(events)

    def _take(self, final: bool) -> tuple[str, dict[str, Any]]:
        with self._lock:
            if final and self._partial:
                self._buffer.append(self._partial)
                self._partial = ""
            chunk, self._buffer = "".join(self._buffer), []
            events, self._events = self._events, {}
        return chunk, events

    def _loop(self) -> None:
        while not self._stop.wait(_FLUSH_INTERVAL_S):
            chunk, events = self._take(final=False)
            if chunk or events:
                self._owner.append_log.remote(self._key, chunk, events)

    def close(self) -> None:
        """Stop the thread and deliver what is left, waiting so the Airflow side sees it first."""
        self._stop.set()
        self._thread.join(timeout=5)
        chunk, events = self._take(final=True)
        if chunk or events:
            ray.get(self._owner.append_log.remote(self._key, chunk, events), timeout=30)


class _Tee(io.TextIOBase):
    def __init__(self, original: Any, sink: _LogSink) -> None:
        self._original = original
        self._sink = sink

    def write(self, text: str) -> int:
        try:
            self._original.write(text)
        except Exception:  # noqa: BLE001 - a closed original stream must not break user code
            pass
        self._sink.write(text)
        return len(text)

    def flush(self) -> None:
        try:
            self._original.flush()
        except Exception:  # noqa: BLE001
            pass

    def isatty(self) -> bool:
        return False


class _FdCapture:
    """Copies everything written to file descriptors 1 and 2 into the sink while the callable runs.

    Native libraries (xgboost's own log, a C ``printf``) and child processes (``subprocess.run``) write
    to the descriptors, never to ``sys.stdout``. Each descriptor is pointed at a pipe; a pump thread per
    pipe passes what arrives on to the original file, so Ray's worker log keeps it, and whole lines
    only to the sink, so stdout and stderr never mix inside a line. A Ray worker runs one task at a
    time, so the capture holds only this task's output. (Not wurlitzer, which does this for Python
    streams: it would have to be installed on, or shipped to, every stock Ray node.)

    Limits, as for any pipe-based capture: C stdio buffers its output when stdout is not a terminal,
    so a library's ``printf`` arrives when the library flushes, at the latest when the callable
    returns (the capture flushes C's streams); and a C extension that holds the GIL while it writes
    more than the pipe holds (1 MiB is asked for) stalls until it lets the GIL go.
    """

    PIPE_BYTES = 1 << 20
    _F_SETPIPE_SZ = 1031  # Linux fcntl

    def __init__(self, sink: _LogSink) -> None:
        self._sink = sink
        self._saved: dict[int, int] = {}
        self._pumps: list[threading.Thread] = []
        self._detached = False

    def start(self) -> None:
        _flush_c_streams()
        try:
            for fd in (1, 2):
                saved = os.dup(fd)
                self._saved[fd] = saved
                read_end, write_end = os.pipe()
                with contextlib.suppress(OSError):  # a smaller default pipe still works, only sooner full
                    fcntl.fcntl(write_end, self._F_SETPIPE_SZ, self.PIPE_BYTES)
                os.dup2(write_end, fd)
                os.close(write_end)
                pump = threading.Thread(target=self._pump, args=(read_end, saved), daemon=True,
                                        name=f"airflow-ray-fd{fd}-pump")
                pump.start()
                self._pumps.append(pump)
        except OSError:
            self.stop()
            raise

    def _pump(self, read_end: int, original: int) -> None:
        partial = b""
        try:
            while data := os.read(read_end, 65536):
                with contextlib.suppress(OSError):  # the worker's own log file is gone: keep capturing
                    view = memoryview(data)
                    while view:
                        view = view[os.write(original, view):]
                if self._detached:
                    continue
                partial += data
                head, newline, partial = partial.rpartition(b"\n")
                if newline:
                    self._sink.write(head.decode(errors="replace") + "\n")
            if partial and not self._detached:  # ended without a newline: still a line of its own, not
                self._sink.write(partial.decode(errors="replace") + "\n")  # the head of the other stream's next
        finally:
            os.close(read_end)
            os.close(original)

    def stop(self) -> None:
        """Flush every stream into the pipes, give the descriptors back, and drain what is left."""
        _flush_c_streams()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
        # A pump ends at EOF, i.e. at once unless a child process the callable left running still holds
        # the pipe; that child's later output then goes on to Ray's worker log only.
        for pump in self._pumps:
            pump.join(timeout=2.0)
        self._detached = True


def _flush_c_streams() -> None:
    """``fflush(NULL)``: what C code buffered in its ``stdout``/``stderr`` is written out now."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


def _backed_by_descriptors() -> bool:
    """Whether ``sys.stdout``/``sys.stderr`` write to descriptors 1 and 2 (in a Ray worker they do)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


@contextmanager
def _captured_output(sink: _LogSink) -> Iterator[None]:
    """The callable's output, all of it, copied to the sink: descriptors 1 and 2 where Python's streams
    use them (then ``print`` reaches the sink through the descriptor, once), else Python's streams."""
    old_out, old_err = sys.stdout, sys.stderr
    fds: _FdCapture | None = None
    if _backed_by_descriptors():
        fds = _FdCapture(sink)
        try:
            fds.start()
        except OSError as exc:  # no spare descriptors: Python-level output only
            print(f"Capturing only Python's own output for this task: cannot redirect descriptors ({exc})",
                  file=sys.stderr)
            fds = None
    if fds is None:
        sys.stdout, sys.stderr = _Tee(old_out, sink), _Tee(old_err, sink)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = old_out, old_err
        if fds is not None:
            fds.stop()


class _MadeByThisTry:
    """Placement groups and actors the callable creates from this worker process, for cleanup if the try fails.

    Ray ties a placement group made inside a task to the task's *job*, not to the task or its worker:
    these tasks belong to the keeper's job, which never ends, so without this a dead try's placement
    groups hold their CPUs until the cluster restarts (and its retry may wait for them forever). Each
    one is reported to the owner actor the moment it exists, because a killed worker reports nothing
    afterwards. Actors made here die with this worker process (Ray fate-shares them with their owner),
    but a callable that raised leaves its worker alive for reuse, so those still referenced are killed
    here.

    Only this process is watched: placement groups made by a child task or actor are not seen.
    """

    def __init__(self, owner: Any, key: str) -> None:
        self._owner = owner
        self._key = key
        self.attempt = uuid.uuid4().hex  # a Ray-level retry of the same key is a new attempt
        self.actors: list[tuple[weakref.ref[Any], str]] = []

    def report(self, placement_groups: list[Any], wait: bool) -> None:
        ref = self._owner.note_created.remote(self._key, self.attempt, placement_groups)
        if wait:  # delivered before the caller can use (and the try can die holding) the placement group
            ray.get(ref, timeout=30)

    def kill_live_actors(self) -> list[str]:
        killed = []
        for handle_ref, label in self.actors:
            handle = handle_ref()
            if handle is None:
                continue  # no handle left here: Ray has already ended it (or will, as its last handle goes)
            try:
                ray.kill(handle, no_restart=True)
                killed.append(label)
            except Exception as exc:  # noqa: BLE001 - one stuck actor must not keep the others alive
                print(f"Could not kill actor {label}: {exc}", file=sys.stderr)
        return killed


@contextmanager
def _tracking_what_this_try_makes(made: _MadeByThisTry) -> Iterator[None]:
    """While the callable runs, note what it creates; Ray's own entry points are restored afterwards.

    Both ``placement_group()`` and every actor creation go through one function each
    (``ray_compat.placement_group_cell`` and ``ray_compat.actor_creation``).
    """
    cell = ray_compat.placement_group_cell()
    create_pg = cell.cell_contents if cell is not None else None
    create_actor = ray_compat.actor_creation()

    def recording_placement_group(*args: Any, **kwargs: Any) -> Any:
        pg = create_pg(*args, **kwargs)
        lifetime = kwargs["lifetime"] if "lifetime" in kwargs else (args[3] if len(args) > 3 else None)
        if lifetime != "detached":  # a detached placement group is meant to outlive the try
            try:
                made.report([pg], wait=True)
            except Exception as exc:  # noqa: BLE001 - creating it succeeded; only the cleanup is at risk
                print(f"Could not tell the owner actor about placement group {pg.id.hex()}; it will not be "
                      f"released if this try dies: {exc}", file=sys.stderr)
        return pg

    def recording_remote(self: Any, args: Any = None, kwargs: Any = None, **actor_options: Any) -> Any:
        handle = create_actor(self, args, kwargs, **actor_options)
        # get_if_exists may hand back someone else's actor; when it creates one, it recurses here without it.
        if not actor_options.get("get_if_exists") and actor_options.get("lifetime") != "detached":
            label = f"{getattr(self.__ray_metadata__, 'class_name', 'actor')} {handle._actor_id.hex()}"
            made.actors.append((weakref.ref(handle), label))
        return handle

    if cell is None:
        print("This Ray version's placement_group() has an unexpected shape: placement groups this try makes "
              "will not be released if it dies", file=sys.stderr)
    else:
        cell.cell_contents = recording_placement_group
    ray_compat.set_actor_creation(recording_remote)
    try:
        yield
    finally:
        ray_compat.set_actor_creation(create_actor)
        if cell is not None:
            cell.cell_contents = create_pg


def resolve_refs(value: Any) -> Any:
    """Replace ``ObjectRef``s and ``UpstreamRef``s nested in lists, tuples and dicts by their values.

    Ray maps the object zero-copy when it is on this node and transfers it otherwise.
    """
    return map_nested(value, _resolve_ref)


def _resolve_ref(value: Any) -> Any:
    if isinstance(value, UpstreamRef):
        try:
            return ray.get(value.ref)
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
            if value.checkpoint is not None:
                checkpoint, part, sha256 = value.checkpoint
                print(f"The result of {value.label} is gone from the Ray object store ({type(exc).__name__}); "
                      f"restoring it from its checkpoint {checkpoint.uri}", file=sys.stderr)
                return checkpoint.load_result(part=part, expected_sha256=sha256)
            raise UpstreamObjectLost(
                f"The result of {value.label} is gone from the Ray object store ({type(exc).__name__}); "
                f"rerun that task, or mark it checkpoint=True so it can be restored"
            ) from None
    if isinstance(value, ray.ObjectRef):
        return ray.get(value)
    return value


def open_envelope(envelope: CallEnvelope) -> tuple[Any, ...]:
    """The ``(callable bytes, args, kwargs[, job])`` of a call that came through the gateway, each ``HeldInput``
    in its arguments replaced by the upstream ref the gateway looked up (resolved by ``resolve_refs``).

    The payload was cloudpickled by the Airflow side and authenticated by the gateway (which never unpickles it):
    only here, inside the user's Ray task, is it loaded."""
    fn_bytes, args, kwargs, *job = pickle.loads(envelope.payload)

    def swap(value: Any) -> Any:
        if isinstance(value, HeldInput):
            if not 0 <= value.index < len(envelope.inputs):
                raise ValueError(f"the call names input {value.index} ({value.label}) but has "
                                 f"{len(envelope.inputs)} input(s)")
            return UpstreamRef(envelope.inputs[value.index], value.label, value.checkpoint)
        return value

    return (fn_bytes, map_nested(args, swap), map_nested(kwargs, swap), *job)


@ray.remote
def run_callable(payload: tuple[Any, ...] | CallEnvelope, key: str, owner: Any) -> Any:
    """Run one Airflow task's callable; its return value becomes the owner's object.

    ``payload`` is ``(callable bytes, args, kwargs)`` plus, for ``checkpoint=True``, a
    :class:`CheckpointJob`. The checkpoint is complete before this returns, so the
    Airflow task succeeds only with its result durably stored.
    """
    sink = _LogSink(owner, key)
    ctx = ray.get_runtime_context()
    # Where it runs, as the Ray dashboard names it: the Airflow task links to its task, node and worker logs.
    sink.event(node_id=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address(), pid=os.getpid(),
               task_id=ctx.get_task_id(), job_id=ctx.get_job_id(), worker_id=ctx.get_worker_id())
    sink.start()
    try:
        if isinstance(payload, CallEnvelope):
            payload = open_envelope(payload)
        fn_bytes, args, kwargs, job = (*payload, None)[:4]
        events: dict[str, Any] = {}
        result, manifest = _reuse(job, sink) if job is not None and job.reuse else (None, None)
        if manifest is not None:
            sink.write(f"Restored this task's result from its checkpoint {job.checkpoint.uri} "
                       f"({manifest.size} bytes, written {time.ctime(manifest.created)}) instead of recomputing "
                       f"it: same callable and inputs (checkpoint_recompute=True forces a rerun)\n")
            events["checkpoint"] = {"uri": job.checkpoint.result_uri, "sha256": manifest.sha256, "restored": True}
        else:
            fn: Callable[..., Any] = cloudpickle.loads(fn_bytes)
            made = _MadeByThisTry(owner, key)
            # Not waited for: it only tells the owner that an earlier attempt (if any) is over.
            made.report([], wait=False)
            with _captured_output(sink), ckpt.bound(job.checkpoint if job is not None else None):
                # Inside the capture: a restore from a checkpoint says so in the Airflow task log.
                args, kwargs = resolve_refs(args), resolve_refs(kwargs)
                try:
                    with _tracking_what_this_try_makes(made):
                        result = fn(*args, **kwargs)
                    if inspect.isgenerator(result) or inspect.isasyncgen(result):
                        # Returned as is, Ray would keep the first item and drop the rest, silently.
                        raise TypeError(f"The callable returned a {type(result).__name__}, which cannot be a task "
                                        f"result: Ray would keep only its first item. Return its items as a list "
                                        f"(`return list(...)`)")
                except BaseException:
                    # The owner releases this try's placement groups once it sees the failure; the actors
                    # it still references would live on in this (reused) worker, so they go now.
                    killed = made.kill_live_actors()
                    if killed:
                        print(f"Killed {len(killed)} actor(s) this failed try created: {', '.join(killed)}",
                              file=sys.stderr)
                    raise
            if job is not None and job.write:
                info = job.checkpoint.write_result(result, fingerprint=job.fingerprint, split=job.split)
                sink.write(f"Checkpoint written to {info['uri']} ({info['size']} bytes, sha256 "
                           f"{info['sha256'][:12]}…) in {info['seconds']:.2f}s\n")
                events["checkpoint"] = {"uri": info["uri"], "sha256": info["sha256"], "restored": False}
        cls = type(result)
        events.update(returned_type=f"{cls.__module__}.{cls.__qualname__}", described=describe(result))
        if isinstance(result, dict) and len(result) <= MAX_SPLIT_ITEMS and all(isinstance(k, str) for k in result):
            events["names"] = list(result)
        sink.event(**events)
        return result
    finally:
        sink.close()


def _reuse(job: CheckpointJob, sink: _LogSink) -> tuple[Any, ckpt.Manifest | None]:
    """The result of an earlier try with the same fingerprint, if its checkpoint is intact."""
    try:
        manifest = job.checkpoint.read_manifest()
    except ckpt.CheckpointNotFound:
        return None, None
    except ckpt.CheckpointCorrupted as exc:  # e.g. planted by someone who can write to the bucket
        sink.write(f"Not reusing the checkpoint at {job.checkpoint.uri}: {exc}. Recomputing.\n")
        return None, None
    if manifest.fingerprint != job.fingerprint:
        sink.write(f"The checkpoint at {job.checkpoint.uri} was written for a different callable or inputs "
                   f"(fingerprint {str(manifest.fingerprint)[:12]}…, now {job.fingerprint[:12]}…); recomputing\n")
        return None, None
    try:
        return job.checkpoint.load_result(manifest), manifest
    except ckpt.CheckpointCorrupted as exc:
        sink.write(f"Not reusing the checkpoint at {job.checkpoint.uri}: {exc}. Recomputing.\n")
        return None, None


@ray.remote(num_cpus=0)
def split_items(value: Any, names: list[Any] | None) -> tuple[Any, ...]:
    """Return each item of a list/tuple (``names`` None) or dict as its own object, then their summaries.

    Called with ``num_returns=len(items) + 1`` so every item becomes a separately owned object.
    """
    items = list(value) if names is None else [value[name] for name in names]
    return (*items, [describe(item) for item in items])


@ray.remote(num_cpus=0)
def adopt(payload: list[ray.ObjectRef]) -> Any:
    """Copy an object into one the caller (the owner actor) owns; used for plain tasks' large XComs."""
    return ray.get(payload[0])


def pickled(value: Any) -> bytes:
    """``value`` for a client outside Ray: plain pickle where it can (any Python with the value's classes loads it),
    cloudpickle otherwise (e.g. a lambda inside the value, pickled by value)."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # noqa: BLE001 - see above
        return cloudpickle.dumps(value, protocol=5)


def failure_of(wrapped: list[ray.ObjectRef]) -> bytes:
    """The exception a failed call raised, pickled for the Airflow side (which re-raises an Airflow skip or fail as
    such); its text in a ``RuntimeError`` when the exception itself cannot be pickled."""
    try:
        ray.get(wrapped[0])
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
    else:
        raise ValueError("the call did not fail: it has a value, not an exception")
    if type(cause).__module__.partition(".")[0] == "ray":  # e.g. the worker could not start: the Airflow side
        cause = RuntimeError(f"{type(cause).__name__}: {cause}")  # may have no Ray to load Ray's classes with
    try:
        return pickled(cause)
    except Exception:  # noqa: BLE001 - e.g. an exception holding a lock
        return pickle.dumps(RuntimeError(f"{type(cause).__name__}: {cause}"), protocol=5)


@ray.remote(num_cpus=0, num_returns="streaming")
def value_frames(wrapped: list[ray.ObjectRef], frame_bytes: int) -> Iterator[bytes]:
    """A held value's pickle, ``frame_bytes`` at a time, for the gateway to stream to a client outside Ray: the
    gateway holds one frame at a time, never the value (Ray's generator backpressure bounds what waits).

    Plain pickle where it can (any Python with the value's classes loads it), cloudpickle otherwise."""
    data = pickled(ray.get(wrapped[0]))
    view = memoryview(data)
    for start in range(0, len(view), frame_bytes):
        yield bytes(view[start:start + frame_bytes])
    if not view:
        yield b""
