"""A Ray driver subprocess per ``ray`` connection, so the triggerer itself never joins a cluster.

Why a subprocess: a Ray driver blocks (``ray.get``, ``ray.init`` retrying for minutes), and a driver
whose cluster is restarted behind the same address is killed by Ray's C++ core with no Python
exception. Inside the triggerer either would stall or kill every trigger of every provider. Here
the watcher process dies instead, and the triggerer-side :class:`WatcherClient` starts a new one.

Protocol (JSON lines; the watcher's stdin carries requests, its stdout answers, stderr is its log):

* first line from the watcher: ``{"id": 0, "ready": true, "pid": n}``, or
  ``{"id": 0, "fatal": "why"}`` when it cannot connect (it then exits);
* ``{"id": n, "op": "poll", "namespace": s, "shard": i, "key": s}`` →
  ``{"id": n, "state": "running"|"finished"|"failed"|"cancelled"|"unknown", "error": str|None}``;
  the poll reads the state with a huge log offset (no log lines are shipped) and renews the run's lease;
* ``{"id": n, "op": "cancel", "namespace", "shard", "key"}`` → ``{"id": n, "cancelled": bool}``;
* an answer with ``"fault": "why"`` instead means the watcher could not ask the owner actor
  (timeout, actor error): the cluster, not the run, is in trouble.

Run as ``python -m airflow_ray_provider.triggers.watcher <conn_id>``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from airflow_ray_provider.exceptions import WatcherDied, WatcherUnavailable

log = logging.getLogger(__name__)

# -- shared bounds ----------------------------------------------------------------------------------
# The owner answers poll(timeout=0) from memory in milliseconds; this bounds a wedged or restarting owner.
POLL_CALL_TIMEOUT_S = 20.0
# TaskOwner.cancel waits up to 10 s for the Ray task to end, plus the round trip.
CANCEL_CALL_TIMEOUT_S = 30.0
# How long the triggerer side waits for one answer once sent; above the watcher's own bounds, so a
# late answer means the watcher itself is wedged (then it is killed and restarted).
ANSWER_TIMEOUT_S = 45.0
# How long one request may take in all, watcher (re)starts included; then the caller hears of it
# (the trigger counts it towards its unreachable limit and asks again).
REQUEST_TIMEOUT_S = 60.0
# ray.init is bounded by the connection's connect_timeout (30 s by default) plus the hook's checks.
START_TIMEOUT_S = 120.0
# Restart backoff after a watcher died or could not connect: 0.5 s, doubling, capped.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# Concurrent owner calls in one watcher: 100 watched runs polled every 2 s never queue behind each other.
POOL_SIZE = 32
_STDERR_TAIL = 30  # lines of a dead watcher's stderr kept for the error message

WATCHER_MODULE = "airflow_ray_provider.triggers.watcher"


# -- the watcher process ----------------------------------------------------------------------------
class _Server:
    """Serves requests on stdin with a thread pool; each answer is written as one line under a lock."""

    def __init__(self, conn_id: str, out: IO[str]) -> None:
        self.conn_id = conn_id
        self.out = out
        self.write_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="ray-watch")
        self.owners: dict[tuple[str, int], Any] = {}

    def answer(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=str) + "\n"
        with self.write_lock:
            self.out.write(line)
            self.out.flush()

    def _owner(self, namespace: str, shard: int) -> Any:
        """The owner actor's handle, or None if it does not exist.

        Not ``owner_mod.get_owner``: that creates a missing owner, and a poll must not create one
        (a missing owner means the run is gone: "unknown").
        """
        import ray

        from airflow_ray_provider.cluster import owner as owner_mod

        handle = self.owners.get((namespace, shard))
        if handle is None:
            try:
                handle = ray.get_actor(owner_mod.owner_name(shard), namespace=namespace)
            except ValueError:
                return None
            self.owners[(namespace, shard)] = handle
        return handle

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        import ray

        from airflow_ray_provider.cluster import owner as owner_mod
        from airflow_ray_provider.exceptions import RayWaitTimeout

        rid, op = request.get("id"), request.get("op")
        namespace, shard, key = str(request.get("namespace")), int(request.get("shard", 0)), str(request.get("key"))
        label = owner_mod.owner_label(namespace, shard)
        try:
            owner = self._owner(namespace, shard)
            if op == "poll":
                if owner is None:
                    return {"id": rid, "state": "unknown", "error": f"{label} does not exist"}
                status = owner_mod.poll_state(owner, key, timeout=POLL_CALL_TIMEOUT_S,
                                              what=f"{label}: poll of key {key!r}")
                return {"id": rid, "state": status["state"], "error": status.get("error")}
            if op == "cancel":
                if owner is None:
                    return {"id": rid, "cancelled": False}
                done = owner_mod.bounded_get(owner.cancel.remote(key), timeout=CANCEL_CALL_TIMEOUT_S,
                                             what=f"{label}: cancel of key {key!r}")
                return {"id": rid, "cancelled": bool(done)}
            return {"id": rid, "fault": f"unknown op {op!r}"}
        except (RayWaitTimeout, ray.exceptions.RayError) as exc:
            # A restarted owner gets a new handle next time (Ray re-resolves it, but drop ours anyway).
            self.owners.pop((namespace, shard), None)
            return {"id": rid, "fault": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # noqa: BLE001 - answered, so the triggerer side is never left waiting
            return {"id": rid, "fault": f"{type(exc).__name__}: {exc}"}

    def serve(self, requests: IO[str]) -> None:
        for line in requests:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except ValueError:
                log.warning("Ignoring a request that is not JSON: %.200r", line)
                continue
            self.pool.submit(lambda r=request: self.answer(self.handle(r)))
        # stdin closed: the triggerer (or its runner) is gone, and so is every trigger we served.


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python -m {WATCHER_MODULE} <ray_conn_id>", file=sys.stderr)
        return 2
    conn_id = argv[1]
    # fd 1 is the protocol channel: keep a private copy of it, then point fd 1 (and sys.stdout) at
    # stderr, so anything Ray's C++ core or user code prints cannot corrupt the protocol.
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s watcher[{conn_id}] %(levelname)s %(name)s: %(message)s")
    server = _Server(conn_id, out)
    try:
        from airflow_ray_provider.hooks.ray import RayHook

        RayHook(conn_id).get_conn()
    except Exception as exc:  # noqa: BLE001 - reported to the triggerer side, which retries with backoff
        server.answer({"id": 0, "fatal": f"{type(exc).__name__}: {exc}"})
        return 3
    server.answer({"id": 0, "ready": True, "pid": os.getpid()})
    server.serve(sys.stdin)
    # Do not wait for in-flight owner calls: nobody reads their answers any more.
    server.pool.shutdown(wait=False, cancel_futures=True)
    os._exit(0)  # skip Ray's atexit shutdown, which can take seconds with a dead GCS


# -- the triggerer side -----------------------------------------------------------------------------
NO_DB_URL = "sqlite:////nonexistent/airflow-ray-watcher-has-no-metadata-db"


class WatcherClient:
    """The triggerer's end of one connection's watcher: one per (event loop, conn_id), shared by triggers.

    Requests are matched to answers by id; a reader task resolves their futures. When the watcher
    dies, pending requests are sent again to a new one, started after a backoff.
    """

    def __init__(self, conn_id: str) -> None:
        self.conn_id = conn_id
        self.proc: asyncio.subprocess.Process | None = None
        self._ready: asyncio.subprocess.Process | None = None  # self.proc once it sent its ready line
        self.restarts = 0  # watchers started after the first: for tests and logs
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._starting: asyncio.Task[None] | None = None  # the start in progress, shared by all requests
        self._failures = 0  # consecutive failed starts or deaths, for the backoff
        self._last_death = 0.0
        self._last_error = ""
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc is self._ready and self.proc.returncode is None

    async def _environment(self) -> dict[str, str]:
        """The triggerer's environment, plus the connection itself.

        The watcher has no Airflow supervisor to ask for connections, so the triggerer resolves it
        (through Airflow's secrets chain, without blocking: ``aget_connection``) and hands it over as
        ``AIRFLOW_CONN_<ID>``, the env var backend every process reads first. The environment of a
        process is readable only by its user, unlike its command line.
        """
        env = dict(os.environ)
        # Airflow's supervisor puts "airflow-db-not-allowed:///" in the environment of the processes it runs
        # (the triggerer's trigger runner among them), which no new interpreter can import Airflow with.
        # The watcher needs no metadata DB either: it gets a URL that parses and leads nowhere.
        for name in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__SQL_ALCHEMY_CONN"):
            if env.get(name, "").startswith("airflow-db-not-allowed"):
                env[name] = NO_DB_URL
        try:
            from airflow.sdk import BaseHook

            conn = await BaseHook.aget_connection(self.conn_id)
            env[f"AIRFLOW_CONN_{self.conn_id.upper()}"] = conn.as_json()
        except Exception as exc:  # noqa: BLE001 - e.g. no ray_default: the watcher's RayHook decides
            log.debug("Connection %r not resolved in the triggerer (%s); the watcher looks it up", self.conn_id, exc)
        return env

    async def _start(self) -> None:
        """Start a watcher and wait for its ready line; raise WatcherUnavailable if it does not come."""
        if self._failures:
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._failures - 1))
            wait = delay - (time.monotonic() - self._last_death)
            if wait > 0:
                await asyncio.sleep(wait)
        if self.proc is not None:
            self.restarts += 1
        self._stderr_tail.clear()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", WATCHER_MODULE, self.conn_id,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=await self._environment(),
            limit=1 << 20,
        )
        self.proc = proc
        self._spawn(self._drain_stderr(proc))
        try:
            first = await asyncio.wait_for(self._first_line(proc), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            first = {"fatal": f"no ready line within {START_TIMEOUT_S:g}s"}
        except BaseException:  # cancelled (the client is closing): a half-started watcher must not linger
            self._kill(proc)
            raise
        if not first.get("ready"):
            self._kill(proc)
            self._note_death(f"the Ray watcher of connection {self.conn_id!r} could not start: {first.get('fatal')}")
            raise WatcherUnavailable(self._last_error)
        self._failures = 0
        self._ready = proc
        log.info("Ray watcher of connection %r started (pid %s)", self.conn_id, proc.pid)
        self._spawn(self._read_answers(proc))

    async def _ensure_started(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for a ready watcher, starting one if none is starting.

        The start is one task shared by every waiting request, and shielded from their deadlines:
        on a loaded machine a start can outlast one request's timeout, and cancelling it would
        throw away a nearly ready watcher (then the next request starts again, and so on forever).
        """
        if self.alive:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.get_running_loop().create_task(self._start())
            # Retrieved here too, so a failed start that every waiter gave up on logs no "never retrieved".
            self._starting.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.wait_for(asyncio.shield(self._starting), timeout)

    async def _first_line(self, proc: asyncio.subprocess.Process) -> dict[str, Any]:
        """The ready (or fatal) line. Anything before it is not protocol: e.g. a warning that Python
        itself prints while importing, before the watcher moved stdout; logged and skipped."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if isinstance(message, dict) and message.get("id") == 0:
                return message
            log.debug("Ray watcher of %r printed before its ready line: %.300r", self.conn_id, line)
        return {"fatal": f"exited with code {await proc.wait()} before it was ready"}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # kept referenced, else the loop may drop a running task
        task.add_done_callback(self._tasks.discard)

    def _note_death(self, why: str) -> None:
        self._failures += 1
        self._last_death = time.monotonic()
        tail = " | ".join(list(self._stderr_tail)[-5:])
        self._last_error = f"{why}{'; its last log lines: ' + tail if tail else ''}"

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        """Forward the watcher's log to this process's log (and keep a tail for error messages)."""
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._stderr_tail.append(text)
            log.debug("%s", text)

    async def _read_answers(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning("Ray watcher of %r wrote a non-JSON line: %.200r", self.conn_id, line)
                    continue
                future = self._pending.pop(message.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except asyncio.CancelledError:
            # The event loop is closing (a triggerer stopping; ``dag.test()`` ending its in-line trigger
            # run): the watcher waits on its stdin and would never exit, so this task would never end.
            self._kill(proc)
            raise
        finally:
            rc = await proc.wait()
            if proc is self.proc and not self._closed:
                self._note_death(f"the Ray watcher of connection {self.conn_id!r} (pid {proc.pid}) exited "
                                 f"with code {rc}")
                log.warning("%s; restarting it", self._last_error)
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(WatcherDied(self._last_error))
                self._pending.clear()

    async def request(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its answer, across watcher restarts, for at most ``timeout``
        (default :data:`REQUEST_TIMEOUT_S`, read at call time)."""
        timeout = REQUEST_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WatcherUnavailable(f"no answer to {op} from the Ray watcher of connection {self.conn_id!r} "
                                         f"within {timeout:g}s{'; ' + self._last_error if self._last_error else ''}")
            try:
                await self._ensure_started(remaining)
            except asyncio.TimeoutError:
                continue  # the deadline check above reports it
            except WatcherUnavailable:
                continue  # the next start waits out the backoff, within our deadline
            rid = next(self._ids)
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[rid] = future
            proc = self.proc
            assert proc is not None and proc.stdin is not None
            wait = min(ANSWER_TIMEOUT_S, max(0.0, deadline - time.monotonic()))
            try:
                proc.stdin.write((json.dumps({"id": rid, "op": op, **fields}) + "\n").encode())
                await proc.stdin.drain()
                return await asyncio.wait_for(future, wait)
            except WatcherDied:
                continue  # sent again to the next watcher
            except (BrokenPipeError, ConnectionResetError):
                continue  # it died as we wrote; the reader task notices and we restart it
            except asyncio.TimeoutError:
                if wait < ANSWER_TIMEOUT_S:  # our deadline came first (e.g. most of it went into a slow start)
                    raise WatcherUnavailable(f"no answer to {op} from the Ray watcher of connection "
                                             f"{self.conn_id!r} within {timeout:g}s") from None
                # The watcher bounds every owner call below ANSWER_TIMEOUT_S: silence means it is wedged.
                log.warning("Ray watcher of connection %r (pid %s) did not answer %s within %gs; killing it",
                            self.conn_id, proc.pid, op, wait)
                self._kill(proc)
                raise WatcherUnavailable(f"the Ray watcher of connection {self.conn_id!r} did not answer {op} "
                                         f"within {wait:g}s; it was killed and is restarted") from None
            finally:
                self._pending.pop(rid, None)

    async def poll(self, namespace: str, shard: int, key: str, timeout: float | None = None) -> dict[str, Any]:
        return await self.request("poll", timeout, namespace=namespace, shard=shard, key=key)

    async def cancel(self, namespace: str, shard: int, key: str, timeout: float | None = None) -> dict[str, Any]:
        return await self.request("cancel", timeout, namespace=namespace, shard=shard, key=key)

    async def close(self) -> None:
        """Stop the watcher: closing its stdin makes it exit; killed if it does not within 5 s."""
        self._closed = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except asyncio.TimeoutError:
                self._kill(proc)
                await proc.wait()
        for task in [*self._tasks, *([self._starting] if self._starting else [])]:
            task.cancel()


# One client per connection per event loop: asyncio objects (subprocess transports, futures, locks)
# belong to the loop that made them. Weak keys, so a closed loop's clients go with it.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, WatcherClient]] = weakref.WeakKeyDictionary()


def get_client(conn_id: str) -> WatcherClient:
    """The shared watcher client of ``conn_id`` for the running event loop (its watcher starts on first use)."""
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(conn_id)
    if client is None or client._closed:
        client = per_loop[conn_id] = WatcherClient(conn_id)
    return client


async def close_all() -> None:
    """Stop every watcher of the running loop (tests, benchmarks; the triggerer just exits)."""
    per_loop = _clients.pop(asyncio.get_running_loop(), {})
    await asyncio.gather(*(client.close() for client in per_loop.values()), return_exceptions=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
