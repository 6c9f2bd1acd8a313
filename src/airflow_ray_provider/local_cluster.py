"""The embedded Ray head: one persistent local cluster per ``$AIRFLOW_HOME``.

Starting a fresh ``ray.init()`` cluster inside every Airflow task would cost
seconds per task and lose every object when the task process exits. Instead the
first caller starts a head with ``ray start`` in its own session (so no task
process owns it) and records it in a state file; every later caller, in any
process, reuses it. A file lock makes concurrent first callers start exactly one
head. All ports are chosen free at start; Ray's fixed defaults (6379 for the GCS,
10001, 8265, 52365) are never used because other services hold them here.

The head is private to the user who started it: it listens on loopback only, requires
a random token (``$AIRFLOW_HOME/ray/auth-token``, 0600) from every client, and keeps its
state, logs and Ray temp dir in 0700 directories. Its state file is checked against the
live processes (pid, create time, command line, temp dir) before anything is signalled,
so a stale file never leads to killing an unrelated process.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from airflow_ray_provider.cluster import ray_compat
from airflow_ray_provider.cluster.ray_compat import LOOPBACK_ONLY_ENV
from airflow_ray_provider.config import airflow_home
from airflow_ray_provider.exceptions import LocalClusterError

START_TIMEOUT_S = 120.0
# `ray start` gives a new raylet fixed windows (its agents 15 s to report their ports, then 30 s to register;
# Ray has no setting for either, ray/_private/node.py): on a loaded machine a start fails now and then, and a
# later one does not. A start that timed out is tried again, with a growing pause, until START_DEADLINE_S
# has passed (CI saw three in a row time out at a load average of 8-18 on 2 cores); any other failure (a
# port taken in between, a bad option) is tried START_ATTEMPTS times, so a real error still comes fast.
START_ATTEMPTS = 3
START_DEADLINE_S = 300.0
START_RETRY_PAUSE_S = 2.0
# The first of those windows is the one a loaded host misses: the raylet waits a fixed 15 s for its dashboard
# agent to write its listen port to a file (WaitForPersistedPort's default, node_manager.cc, Ray 2.54-2.60), and
# no `ray start` option avoids the wait (the raylet is never told that port). The agent needs about 3 CPU-s of
# imports; at a load average of 10-20 on 2 cores it got less than that in 15 s, on every retry (run 17,
# benchmarks/results/suite_tiers.md). The head runs in a session of its own, which Linux's autogroup makes a CPU
# group of its own: it gets one share against every other busy group (another head, the Airflow processes), split
# among its 7 starting processes. So the head's session starts this many nice levels above the caller where the
# OS allows it (root or CAP_SYS_NICE; elsewhere the retries above are all there is), and is set back to the
# caller's level once the head is up, before any worker (user code) starts (benchmarks/head_start_load.py).
START_PRIORITY_BOOST = 10
# Every Airflow task process is a new Ray driver, and by default Ray prestarts idle workers
# for each new driver's job. Ours never run tasks themselves (the owner actor submits them),
# so those workers would only cost CPU and memory on every task start. This does not make
# the warm worker survive between tasks: that depends on the owner actor's creating job
# staying alive (see benchmarks/results/chain10*.md and benchmarks/worker_reuse.py).
RAY_SYSTEM_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0"}
# Ray's Prometheus endpoint (the dashboard agent's metrics export port) answers without the head's token,
# and the owner actors' metric names carry every DAG, run and task id: off on the embedded head unless the
# user's environment sets RAY_enable_metrics_collection itself (README, "Trust boundaries"). It also spares
# every Ray process of the head the metrics pushes.
METRICS_ENV = "RAY_enable_metrics_collection"
LOOPBACK = "127.0.0.1"
# Ray rewrites a loopback --node-ip-address to the machine's address (services.resolve_ip_for_localhost
# -> get_node_ip_address) unless ray_constants.ENABLE_RAY_CLUSTER is false; every server of the node
# (GCS, raylet, dashboard agent, Ray Client) then binds all interfaces. With the switch off,
# get_node_ip_address() returns 127.0.0.1, and each server sees a loopback node IP and binds loopback
# only (e.g. dashboard/agent.py, util/client/server/server.py: `is_localhost(ip)`). The switch also
# makes `ray start --address` refuse to join other nodes to *this* process's cluster, which it never does.
# (The switch and the constant are private Ray API: cluster/ray_compat.py.)
TOKEN_FILE_NAME = "auth-token"
_STATE_VERSION = 2
_OLD_STATE_VERSIONS = frozenset({1})  # readable, but without process marks: never trusted for signalling
_MARKED_PROCESSES = ("gcs_server", "raylet")  # what identifies a head we started (see _verify)
_PRIVATE = 0o077  # group/other permission bits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessMark:
    """One process of the head as it was right after start: enough to tell it from a reused pid."""

    pid: int
    create_time: float
    name: str


@dataclass(frozen=True)
class LocalClusterState:
    """What the state file records about a running embedded head (never the token itself)."""

    address: str
    gcs_port: int
    session_id: int
    temp_dir: str
    dashboard_url: str | None
    started_at: float
    version: int = _STATE_VERSION
    client_address: str | None = None  # Ray Client (ray://); absent in state files written before it
    auth_mode: str = "disabled"  # "token" or "disabled"; version-1 heads ran without auth
    token_file: str | None = None  # where the token lives; None with auth disabled or the user's RAY_AUTH_TOKEN
    session_started_at: float = 0.0  # create time of the `ray start` process that leads the session
    processes: tuple[ProcessMark, ...] = field(default_factory=tuple)




# Never handed out, even if the OS offers them: Redis's and the Airflow API server's usual ports.
RESERVED_PORTS = frozenset({6379, 8080})
# A port free_ports returned is not returned again, by any process of this user, for PORT_HOLD_S seconds: between
# free_ports returning it and the process it is for binding it, the OS offers the port to the next bind(0) again.
# Two sessions starting at once were given the same one (a head's runtime-env agent and an S3 server, whose
# answers then reached the raylet: suite run 9, benchmarks/results/suite_tiers.md). Kept in a file of the user's
# cache folder, under a lock; where that cannot be used, ports are handed out as the OS offers them.
PORT_HOLD_S = 600.0
_PORTS_KEPT = 4096  # the newest entries of the file; enough for hundreds of heads started within PORT_HOLD_S
_PORT_ATTEMPTS = 20_000


def user_cache_dir() -> Path:
    """The provider's folder in the user's cache (``$XDG_CACHE_HOME`` or ``~/.cache``), as the Makefile's."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "airflow-ray-provider"


def handed_out_ports_file() -> Path:
    """The file that lists the ports free_ports handed out recently."""
    return user_cache_dir() / "handed-out-ports"


def _read_handed_out(path: Path, now: float) -> dict[int, float]:
    """``{port: when}`` of the entries younger than PORT_HOLD_S; a line that is not ``<port> <time>`` is skipped."""
    found: dict[int, float] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                port_text, when_text = line.split()
                port, when = int(port_text), float(when_text)
                if now - PORT_HOLD_S < when <= now + 60:
                    found[port] = when
    return found


def _write_handed_out(path: Path, entries: dict[int, float]) -> None:
    newest = sorted(entries.items(), key=lambda item: item[1])[-_PORTS_KEPT:]
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{port} {when:.3f}\n" for port, when in newest))
    os.replace(partial, path)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback (released on return): none of RESERVED_PORTS, and none that
    free_ports handed out in the last PORT_HOLD_S seconds (see PORT_HOLD_S)."""
    registry = handed_out_ports_file()
    lock: FileLock | None = None
    try:
        registry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = FileLock(f"{registry}.lock", timeout=30)
        lock.acquire()
    except (OSError, Timeout) as exc:
        log.debug("Handing out ports without the record of recent ones (%s: %s)", registry, exc)
        lock = None
    try:
        now = time.time()
        recent = _read_handed_out(registry, now) if lock is not None else {}
        sockets: list[socket.socket] = []
        ports: list[int] = []
        try:
            for _ in range(_PORT_ATTEMPTS):
                if len(ports) == count:
                    break
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.1", 0))
                sockets.append(sock)  # a port passed over stays held too, so it is not offered again
                port = sock.getsockname()[1]
                if port not in RESERVED_PORTS and port not in recent:
                    ports.append(port)
            else:
                raise LocalClusterError(f"Found {len(ports)} of {count} free loopback ports in {_PORT_ATTEMPTS} tries")
        finally:
            for sock in sockets:
                sock.close()
        if lock is not None:
            try:
                _write_handed_out(registry, {**recent, **dict.fromkeys(ports, now)})
            except OSError as exc:
                log.debug("Could not record the ports handed out in %s: %s", registry, exc)
        return ports
    finally:
        if lock is not None:
            lock.release()


# RAY_AUTH_* values RayHook put into this process's environment for Ray's token loader. They are the
# provider's, not the user's: processes this package starts, and heads it starts, must not take them
# for a token the user chose (a Test probe of a connection without a password would send another
# connection's token; an embedded head started later would adopt it).
_PROVIDER_AUTH_ENV: dict[str, str] = {}


def set_provider_auth_env(**values: str) -> None:
    """Put ``values`` into ``os.environ`` (Ray reads its token there) and remember they are ours.

    A value the user already set (their own RAY_AUTH_TOKEN, which the embedded head then runs with) stays
    theirs: recorded as ours, it would vanish from ``user_environ`` and the next task would ask no token.
    """
    for name, value in values.items():
        if os.environ.get(name) == value and _PROVIDER_AUTH_ENV.get(name) != value:
            continue
        os.environ[name] = value
        _PROVIDER_AUTH_ENV[name] = value


def user_environ() -> dict[str, str]:
    """``os.environ`` without the RAY_AUTH_* values the provider set itself (see set_provider_auth_env)."""
    return {k: v for k, v in os.environ.items() if _PROVIDER_AUTH_ENV.get(k) != v}


def ray_process_env(auth_token: str | None = None) -> dict[str, str]:
    """The environment for Ray processes this package starts besides the embedded head (joined nodes,
    probe drivers); the head itself gets ``LocalRayCluster._auth_env``.

    With ``auth_token`` (e.g. ``LocalRayCluster.auth_token()``, to join or query the embedded head) the
    process presents that token. Without it, one mode is still set explicitly, because Ray turns token
    auth on whenever ~/.ray/auth_token exists and RAY_AUTH_MODE is unset: the user's RAY_AUTH_MODE if
    given, else ``disabled``.
    """
    env = {**user_environ(), "RAY_USAGE_STATS_ENABLED": "0"}
    # A joining node must not inherit keep_loopback_addresses()'s switch: Ray would refuse to start it.
    for name in LOOPBACK_ONLY_ENV:
        env.pop(name, None)
    if auth_token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_token)
    else:
        env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def _owned_private(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid() and not st.st_mode & _PRIVATE


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` 0700, or tighten it to 0700 if it is ours; refuse one that is not ours.

    ``lstat``, not ``stat``: a symlink planted at a predictable /tmp name must not redirect us.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise LocalClusterError(
            f"Refusing {path}: it must be a directory owned by uid {os.getuid()} (found uid {st.st_uid}, "
            f"mode {stat.filemode(st.st_mode)}); remove it or choose another home"
        )
    if st.st_mode & _PRIVATE:
        os.chmod(path, 0o700)  # made by an older version, or by Ray itself (it chmods its dirs 0777)
    return path


def _open_private(path: Path, flags: int) -> int:
    """Open ``path`` (no symlinks) and check it is ours and neither group nor other can read or write it."""
    fd = os.open(path, flags | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if not _owned_private(st):
        os.close(fd)
        raise LocalClusterError(
            f"Refusing {path}: it must be owned by uid {os.getuid()} and private (mode 0600), found uid "
            f"{st.st_uid} and mode {stat.filemode(st.st_mode)}; fix with `chmod 600 {path}` if it is yours"
        )
    return fd


def _tighten_readable(path: Path) -> None:
    """Make a file of ours that others may only *read* (written 0644 by an older version) 0600.

    One that others may write is left as it is, for ``_open_private`` to refuse: it may have been altered.
    """
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o044 and not st.st_mode & 0o022:
        os.chmod(path, 0o600)


def read_token_file(path: Path) -> str:
    """The token in ``path``, refusing a file that others could read or that is not ours."""
    fd = _open_private(path, os.O_RDONLY)
    with os.fdopen(fd) as f:
        token = f.read().strip()
    if not token or any(c.isspace() for c in token):
        raise LocalClusterError(f"Malformed token file {path}: expected one line with the token")
    return token


def load_or_create_token(path: Path) -> str:
    """The token in ``path``, creating it (0600, 256 random bits) if missing; safe across processes.

    The token is written to a private temp file (``mkstemp``: O_EXCL, 0600) and published with
    ``os.link``, which fails if the name exists: a concurrent reader sees either no file or a
    complete one, and exactly one creator wins.
    """
    with contextlib.suppress(FileNotFoundError):
        return read_token_file(path)
    ensure_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return read_token_file(path)


def is_loopback_host(host: str | None) -> bool:
    return host in ("localhost", LOOPBACK, "::1")


def keep_loopback_addresses() -> None:
    """Let this process (and the processes it starts) reach a loopback Ray address as given.

    Ray's driver rewrites 127.0.0.1 to the machine's address before connecting
    (``services.canonicalize_bootstrap_address`` -> ``resolve_ip_for_localhost``), where a
    loopback-only head does not listen. Ray reads the switch once, at import, into
    ``ray_constants.ENABLE_RAY_CLUSTER``; ``services`` looks the constant up on each call, so
    an already imported Ray is switched too. A process joins one cluster at most, so the
    process-wide switch only affects connections to that (local) cluster.
    """
    os.environ.update(LOOPBACK_ONLY_ENV)
    ray_compat.keep_loopback_addresses()


def port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalRayCluster:
    """A Ray head started with ``ray start`` and tracked by a state file.

    ``home`` holds the state, lock, log and token files (default ``$AIRFLOW_HOME/ray``, 0700).
    Ray's own temp dir lives under ``/tmp`` with a short name, because Ray's
    unix socket paths must stay under 108 characters. Ray chmods its temp and
    session dirs 0777, so it gets ``<temp_dir>/ray`` inside our 0700 ``temp_dir``.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        resources: dict[str, float] | None = None,
        object_store_memory: int | None = None,
        include_dashboard: bool = False,
        loopback_only: bool = True,
        ray_command: str | None = None,
    ) -> None:
        self.home = Path(home) if home is not None else airflow_home() / "ray"
        # The `ray` CLI that starts the head; another environment's (a stock-Ray virtualenv, another Ray
        # version) in tests. Default: the one beside this Python.
        self.ray_command = ray_command
        # False only for a head other Ray nodes must join (they cannot reach a loopback-only head, and
        # Ray refuses `ray start --address` under LOOPBACK_ONLY_ENV): it then binds all interfaces.
        self.loopback_only = loopback_only
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.resources = resources
        self.object_store_memory = object_store_memory
        self.include_dashboard = include_dashboard
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:10]
        self.temp_dir = Path(tempfile.gettempdir()) / f"airflow-ray-{digest}"

    @property
    def state_file(self) -> Path:
        return self.home / "local-cluster.json"

    @property
    def lock_file(self) -> Path:
        return self.home / "local-cluster.lock"

    @property
    def log_file(self) -> Path:
        return self.home / "local-cluster.log"

    @property
    def token_file(self) -> Path:
        return self.home / TOKEN_FILE_NAME

    @property
    def ray_temp_dir(self) -> Path:
        """What Ray gets as ``--temp-dir``.

        Ray chmods it and its session, sockets and logs dirs 0777, not only at start but again in every
        worker process it starts (``Node._init_temp`` -> ``try_make_directory_shared``), so tightening them
        cannot last; the 0700 ``temp_dir`` around them keeps every other user out instead.
        """
        return self.temp_dir / "ray"

    # -- auth ------------------------------------------------------------------
    def _auth_policy(self) -> tuple[str, str | None, Path | None]:
        """``(mode, token, token_file)`` for a head started now from this environment.

        Token auth is the default. The user's RAY_AUTH_MODE=disabled still opts out; the user's own
        RAY_AUTH_TOKEN (which Ray prefers over any token file) is used as it is.
        """
        environ = user_environ()
        if environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
            return "disabled", None, None
        token = load_or_create_token(self.token_file)
        user_token = environ.get("RAY_AUTH_TOKEN")
        # RayHook puts the file's token into RAY_AUTH_TOKEN once it connected: that is still the file.
        if user_token and user_token != token:
            return "token", user_token, None
        return "token", token, self.token_file

    def auth_token(self) -> str | None:
        """The token a client of this head must present (``None`` when its auth is disabled).

        Taken from the state file's record of how the running head was started; without a
        (trusted) state, from the policy the next ``ensure_running`` would apply.
        """
        state = self._read_state_quiet()
        if state is None or state.version != _STATE_VERSION:
            return self._auth_policy()[1]
        if state.auth_mode != "token":
            return None
        if state.token_file is None:
            return user_environ().get("RAY_AUTH_TOKEN")  # the head runs with the user's own token
        if Path(state.token_file) != self.token_file:
            raise LocalClusterError(f"State file {self.state_file} names an unexpected token file {state.token_file}")
        return read_token_file(self.token_file)

    def _auth_env(self) -> tuple[dict[str, str], str, Path | None]:
        """The head's auth environment, its mode, and its token file."""
        mode, token, token_file = self._auth_policy()
        if mode == "disabled":
            log.warning(
                "The embedded Ray head at %s starts WITHOUT token authentication because RAY_AUTH_MODE=disabled "
                "is set: any local user who reaches its loopback ports can run code as this user", self.home,
            )
            return {"RAY_AUTH_MODE": "disabled"}, mode, None
        if token_file is None:
            return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": str(token)}, mode, None
        # The path, not the value: the token then never sits in the environment of every Ray process.
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        return env, mode, token_file

    # -- state -----------------------------------------------------------------
    def _read_state_quiet(self) -> LocalClusterState | None:
        try:
            return self.read_state()
        except LocalClusterError:
            return None

    def read_state(self) -> LocalClusterState | None:
        """The recorded head, validated; ``None`` when there is none."""
        try:
            _tighten_readable(self.state_file)
            fd = _open_private(self.state_file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LocalClusterError(f"Unreadable state file {self.state_file}: {exc}") from exc
        try:
            with os.fdopen(fd) as f:
                raw = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise LocalClusterError(f"Unreadable state file {self.state_file}: {exc}") from exc
        try:
            state = LocalClusterState(
                address=str(raw["address"]),
                gcs_port=int(raw["gcs_port"]),
                session_id=int(raw["session_id"]),
                temp_dir=str(raw["temp_dir"]),
                dashboard_url=None if raw.get("dashboard_url") is None else str(raw["dashboard_url"]),
                started_at=float(raw["started_at"]),
                version=int(raw.get("version", 0)),
                client_address=None if raw.get("client_address") is None else str(raw["client_address"]),
                auth_mode=str(raw.get("auth_mode", "disabled")),
                token_file=None if raw.get("token_file") is None else str(raw["token_file"]),
                session_started_at=float(raw.get("session_started_at", 0.0)),
                processes=tuple(ProcessMark(pid=int(p["pid"]), create_time=float(p["create_time"]),
                                            name=str(p["name"])) for p in raw.get("processes", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LocalClusterError(f"Malformed state file {self.state_file}: {exc!r}") from exc
        if (state.version not in {_STATE_VERSION, *_OLD_STATE_VERSIONS} or not 0 < state.gcs_port < 65536
                or state.session_id <= 1 or state.auth_mode not in ("token", "disabled")):
            raise LocalClusterError(f"Malformed state file {self.state_file}: {raw!r}")
        # Only a loopback address of our own GCS port: a state file must not steer clients elsewhere.
        if state.address != f"{LOOPBACK}:{state.gcs_port}":
            raise LocalClusterError(
                f"Malformed state file {self.state_file}: address {state.address!r} is not {LOOPBACK}:{state.gcs_port}"
            )
        for name, url in (("client_address", state.client_address), ("dashboard_url", state.dashboard_url)):
            if url is not None and not url.startswith((f"ray://{LOOPBACK}:", f"http://{LOOPBACK}:")):
                raise LocalClusterError(f"Malformed state file {self.state_file}: {name} {url!r} is not on loopback")
        return state

    def _write_state(self, state: LocalClusterState) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".local-cluster.", suffix=".json", dir=self.home)  # 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(state), indent=2))
            os.replace(tmp, self.state_file)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _verify(self, state: LocalClusterState) -> tuple[list[psutil.Process], str]:
        """The head's live processes if ``state`` describes a head we started and that still runs.

        Returns ``([], reason)`` otherwise. A pid, a session id and a port can all be reused after a
        reboot or a crash, so a marked process (``gcs_server``/``raylet``) must still match its pid,
        create time, name, session and command line (which names our Ray temp dir). While it lives,
        the kernel cannot hand its session id to anyone else, so the session's members are the head's.
        """
        if state.version != _STATE_VERSION or not state.processes:
            return [], f"state version {state.version} has no process marks to check"
        if state.temp_dir != str(self.temp_dir):
            return [], f"temp dir {state.temp_dir} is not this home's {self.temp_dir}"
        reasons = []
        for mark in state.processes:
            try:
                proc = psutil.Process(mark.pid)
                create_time, name, cmdline = proc.create_time(), proc.name(), " ".join(proc.cmdline())
                sid = os.getsid(mark.pid)
            except (psutil.Error, ProcessLookupError, PermissionError) as exc:
                reasons.append(f"{mark.name} pid {mark.pid}: {type(exc).__name__}")
                continue
            if abs(create_time - mark.create_time) > 0.05 or name != mark.name:
                reasons.append(f"pid {mark.pid} is now {name!r} created at {create_time:.2f}, "
                               f"not {mark.name!r} created at {mark.create_time:.2f}")
            elif sid != state.session_id:
                reasons.append(f"{name} pid {mark.pid} is in session {sid}, not {state.session_id}")
            elif str(self.ray_temp_dir) not in cmdline:
                reasons.append(f"{name} pid {mark.pid} does not run in {self.ray_temp_dir}")
            else:
                return [p for p in self._session_processes(state.session_id)
                        if _created_since(p, state.session_started_at)], ""
        return [], "; ".join(reasons)

    def is_alive(self, state: LocalClusterState) -> bool:
        return self.why_not_serving(state) is None

    def why_not_serving(self, state: LocalClusterState) -> str | None:
        """``None`` if the recorded head serves; else why not, for the CLI and the log.

        Its GCS alone is not a head: with its raylet gone (killed, OOM) the cluster has no node, and a driver
        would connect and then wait for one (about a minute) before blaming the connection.
        """
        procs, reason = self._verify(state)
        return self._broken(state, procs) if procs else f"no process of it runs ({reason})"

    def why_left_broken(self, state: LocalClusterState) -> str | None:
        """Why a head of which processes still run does not serve (for ``airflow-ray local status``);
        ``None`` if it serves or nothing of it runs."""
        procs, _ = self._verify(state)
        return self._broken(state, procs) if procs else None

    def _broken(self, state: LocalClusterState, procs: list[psutil.Process]) -> str | None:
        """What keeps the head of ``procs`` (its verified processes) from serving; ``None`` if nothing."""
        marked = {mark.pid for mark in state.processes}
        alive = {(p.pid, p.name()) for p in procs if p.pid in marked and _is_running(p)}
        dead = [mark for mark in state.processes if (mark.pid, mark.name) not in alive]
        if dead:
            return (f"its {', '.join(f'{m.name} (pid {m.pid})' for m in dead)} exited, so it has no node; a new "
                    f"head starts on the next use (or `airflow-ray local start`)")
        if not port_open(LOOPBACK, state.gcs_port):
            return f"its GCS does not answer on port {state.gcs_port}"
        return None

    def status(self) -> LocalClusterState | None:
        """The running head, or ``None`` (a stale state file counts as none)."""
        state = self.read_state()
        if state is None or not self.is_alive(state):
            return None
        return state

    def _discard_stale(self, state: LocalClusterState) -> None:
        """Stop a recorded head that is provably ours; otherwise just forget it, signalling nothing."""
        procs, reason = self._verify(state)
        if procs:
            # Ours, but not serving (its GCS or raylet died): cleared before a restart, saying why.
            log.warning("The embedded Ray head of %s does not serve: %s. Stopping what is left of it and "
                        "starting a new one", self.home, self._broken(state, procs))
            self._kill(procs)
            return
        log.warning("Discarding stale state file %s (session %d): %s; no process was signalled",
                    self.state_file, state.session_id, reason)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    # -- lifecycle -------------------------------------------------------------
    def _lock(self) -> FileLock:
        return FileLock(str(self.lock_file), timeout=START_DEADLINE_S + START_TIMEOUT_S + 60, mode=0o600)

    def ensure_running(self) -> LocalClusterState:
        """Return the running head, starting it first if needed (safe across processes)."""
        state = self.status()
        if state is not None:
            return state
        ensure_private_dir(self.home)
        with self._lock():
            state = self.status()  # another process may have started it while we waited
            if state is not None:
                return state
            stale = self.read_state()
            if stale is not None:
                self._discard_stale(stale)
            began = time.monotonic()
            for attempt in itertools.count(1):
                try:
                    return self._start()
                except LocalClusterError as exc:
                    why = self._last_start_error()
                    timed_out = "timed out" in why.lower() or "did not finish within" in str(exc)
                    pause = START_RETRY_PAUSE_S * attempt
                    if time.monotonic() + pause - began > START_DEADLINE_S or (
                            not timed_out and attempt >= START_ATTEMPTS):
                        raise LocalClusterError(f"{exc} (attempt {attempt}, {time.monotonic() - began:.0f}s since "
                                                f"the first; the last error: {why})") from None
                    limit = f"until {START_DEADLINE_S:.0f}s have passed" if timed_out else f"of {START_ATTEMPTS}"
                    log.warning("Starting the embedded Ray head failed (attempt %d %s: %s; %s); trying again in "
                                "%.0fs", attempt, limit, exc, why, pause)
                    time.sleep(pause)
            raise AssertionError("unreachable")

    def _last_start_error(self) -> str:
        """The last error line `ray start` wrote to the log (why the start failed), for the warning."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-200:]
        except OSError as exc:
            return f"its log {self.log_file} is unreadable: {exc}"
        errors = [line.strip() for line in lines if line.startswith(("Exception:", "RuntimeError:", "ValueError:"))
                  or "timed out" in line.lower()]
        return errors[-1][:300] if errors else f"see {self.log_file}"

    def _start(self) -> LocalClusterState:
        (gcs, client, agent_listen, agent_grpc, runtime_env_agent, metrics, dashboard, node_manager,
         object_manager) = free_ports(9)
        ray_bin = self.ray_command or shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
        if ray_bin is None:
            raise LocalClusterError("The `ray` command was not found; install ray[default] in this environment")
        ensure_private_dir(self.temp_dir)
        cmd = [
            ray_bin, "start", "--head",
            f"--port={gcs}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--include-dashboard={'true' if self.include_dashboard else 'false'}",
            # Also without the dashboard UI: Ray still runs its dashboard process, told port 8265.
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={self.ray_temp_dir}",
            "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        if self.object_store_memory is not None:
            cmd.append(f"--object-store-memory={self.object_store_memory}")
        auth_env, auth_mode, token_file = self._auth_env()
        env = {k: v for k, v in ray_process_env().items() if not k.startswith("RAY_AUTH_")}
        env.update(RAY_SYSTEM_ENV, **auth_env)
        env.setdefault(METRICS_ENV, "0")
        if env[METRICS_ENV] == "0":  # nor the metrics servers Ray starts regardless (see ray_compat)
            for name, value in ray_compat.NO_METRICS_SERVERS_ENV.items():
                env.setdefault(name, value)
        if self.loopback_only:
            cmd.append(f"--node-ip-address={LOOPBACK}")  # kept loopback only by LOOPBACK_ONLY_ENV, see there
            env.update(LOOPBACK_ONLY_ENV)
        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.fchmod(log_fd, 0o600)  # an older version created it 0644
        with os.fdopen(log_fd, "ab") as log_out:
            # A new session detaches the head from the caller: killing the Airflow
            # task that happened to start it must not take the cluster down.
            # umask 077: every file Ray creates (its logs, sockets) is the user's alone.
            proc = subprocess.Popen(
                cmd, stdout=log_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, umask=0o077,
            )
            # Before `ray start` forks anything (its imports alone take a second): its children inherit the level.
            unboosted = _raise_priority(proc.pid, START_PRIORITY_BOOST)
            try:
                leader_created = psutil.Process(proc.pid).create_time()
            except psutil.Error:
                leader_created = time.time() - 1.0  # already exited: its members were all created later
            try:
                rc = proc.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill_session(proc.pid, not_before=leader_created)
                raise LocalClusterError(
                    f"`ray start --head` did not finish within {START_TIMEOUT_S:.0f}s; see {self.log_file}"
                ) from None
        if rc != 0 or not port_open(LOOPBACK, gcs, timeout=5):
            self._kill_session(proc.pid, not_before=leader_created)
            raise LocalClusterError(f"`ray start --head` failed (exit code {rc}); see {self.log_file}")
        members = [p for p in self._session_processes(proc.pid) if _created_since(p, leader_created)]
        if unboosted is not None:
            _restore_priority([member.pid for member in members], unboosted)
        marks = tuple(_mark(p) for p in members if _name(p) in _MARKED_PROCESSES)
        if not marks:
            self._kill(members)
            raise LocalClusterError(f"`ray start --head` left no gcs_server or raylet running; see {self.log_file}")
        state = LocalClusterState(
            address=f"{LOOPBACK}:{gcs}",
            gcs_port=gcs,
            session_id=proc.pid,
            temp_dir=str(self.temp_dir),
            dashboard_url=f"http://{LOOPBACK}:{dashboard}" if self.include_dashboard else None,
            started_at=time.time(),
            client_address=f"ray://{LOOPBACK}:{client}",
            auth_mode=auth_mode,
            token_file=None if token_file is None else str(token_file),
            session_started_at=leader_created,
            processes=marks,
        )
        self._write_state(state)
        return state

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the recorded head (only its own, verified processes, unlike ``ray stop``)."""
        ensure_private_dir(self.home)
        with self._lock():
            state = self.read_state()
            if state is None:
                return False
            procs, reason = self._verify(state)
            if not procs:
                log.warning("Discarding stale state file %s (session %d): %s; no process was signalled",
                            self.state_file, state.session_id, reason)
            stopped = bool(procs) and self._kill(procs, timeout=timeout)
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
            if stopped and state.temp_dir == str(self.temp_dir):
                shutil.rmtree(state.temp_dir, ignore_errors=True)
            return stopped

    # -- processes -------------------------------------------------------------
    @staticmethod
    def _session_processes(session_id: int) -> list[psutil.Process]:
        me = os.getpid()
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != me and os.getsid(proc.pid) == session_id:
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    def _kill_session(self, session_id: int, *, not_before: float, timeout: float = 30.0) -> bool:
        """Stop a session this process just started (``not_before``: its leader's create time)."""
        return self._kill([p for p in self._session_processes(session_id) if _created_since(p, not_before)],
                          timeout=timeout)

    @staticmethod
    def _kill(procs: list[psutil.Process], timeout: float = 30.0) -> bool:
        """SIGTERM, a short grace (``gcs_server`` ignores SIGTERM), then SIGKILL what is left.

        psutil refuses to signal a ``Process`` whose pid was reused since it was looked up.
        """
        for sig, wait in ((signal.SIGTERM, min(3.0, timeout)), (signal.SIGKILL, timeout)):
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
            _, procs = psutil.wait_procs(procs, timeout=wait)
            if not procs:
                break
        return not procs


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _is_running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (a killed process nobody reaped yet still has its pid and name)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass(frozen=True)
class HeadPriority:
    """The CPU priority a new head's session would have had unboosted, to set it back to once started: its nice
    level (the caller's, inherited) and, where the kernel groups processes by session for CPU shares
    (autogroup), its session's group's nice level (a new session's group starts at 0), else ``None``."""

    nice: int
    group_nice: int | None


def _raise_priority(pid: int, levels: int) -> HeadPriority | None:
    """Give ``pid`` (a new session's leader) ``levels`` nice levels above its own; where sessions are CPU groups
    (autogroup, on by default in most distributions' kernels), raise its session's group too, since the kernel
    shares CPU between groups first and a process's own level only counts inside its group. ``None`` if neither
    could be raised (only root or CAP_SYS_NICE may go above their own level).

    The group's level is read from the head's own session, not the caller's: the caller may sit in no autogroup
    at all (a session older than autogroup, e.g. a container's first), while the head's new session has one (CI
    saw an empty ``/proc/self/autogroup`` in the test process and "nice 0" in the head's)."""
    if levels <= 0:
        return None
    unboosted = HeadPriority(os.getpriority(os.PRIO_PROCESS, 0), _group_nice(pid))
    raised = _set_priority(pid, max(-20, unboosted.nice - levels))
    if unboosted.group_nice is not None:
        raised = _set_group_nice(pid, max(-20, unboosted.group_nice - levels)) or raised
    return unboosted if raised else None


def _restore_priority(pids: list[int], unboosted: HeadPriority) -> None:
    """Set ``pids`` (a head's processes, one session) back to ``unboosted``'s levels, every thread of each: Linux
    keeps a nice level per thread, and a process forked by any of the raylet's threads (a worker) inherits that
    thread's. Their session is one CPU group: set through the first of them still running."""
    for pid in pids:
        try:
            threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            threads = [pid]  # no /proc: the process alone
        for tid in threads:
            _set_priority(tid, unboosted.nice)
    if unboosted.group_nice is not None:
        any(_set_group_nice(pid, unboosted.group_nice) for pid in pids)


def _group_nice(pid: int) -> int | None:
    """The nice level of ``pid``'s session's CPU group (``/proc/<pid>/autogroup``: "/autogroup-85 nice 0"), or
    ``None`` where the kernel has no such groups or ``pid``'s session is in none (the file is then empty)."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _set_group_nice(pid: int, level: int) -> bool:
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(level))
    except OSError as exc:  # not permitted, or the process is gone
        log.debug("Could not set the nice level of pid %d's CPU group to %d: %s", pid, level, exc)
        return False
    return True


def _set_priority(pid: int, level: int) -> bool:
    try:
        os.setpriority(os.PRIO_PROCESS, pid, level)
    except OSError as exc:  # not permitted, or the process is gone
        log.debug("Could not set the nice level of pid %d to %d: %s", pid, level, exc)
        return False
    return True


def _created_since(proc: psutil.Process, since: float) -> bool:
    """Whether ``proc`` was created at or after ``since`` (1 s slack: create times are rounded to clock ticks)."""
    try:
        return proc.create_time() >= since - 1.0
    except psutil.Error:
        return False


def _mark(proc: psutil.Process) -> ProcessMark:
    return ProcessMark(pid=proc.pid, create_time=proc.create_time(), name=proc.name())


def listening_sockets(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """``(ip, port, process name)`` for each TCP socket the processes listen on (to check the binding)."""
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    found.append((conn.laddr.ip, conn.laddr.port, proc.name()))
    return sorted(found)
