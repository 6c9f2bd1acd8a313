"""The embedded Ray head: one persistent local cluster per ``$AIRFLOW_HOME``.

Starting a fresh ``ray.init()`` cluster inside every Airflow task would cost
seconds per task and lose every object when the task process exits. Instead the
first caller starts a head with ``ray start`` in its own session (so no task
process owns it) and records it in a state file; every later caller, in any
process, reuses it. A file lock makes concurrent first callers start exactly one
head. All ports are chosen free at start; Ray's fixed defaults (6379 for the GCS,
10001, 8265, 52365) are never used because other services hold them here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from filelock import FileLock

START_TIMEOUT_S = 120.0
# Every Airflow task process is a new Ray driver, and by default Ray prestarts idle workers
# for each new driver's job. Ours never run tasks themselves (the owner actor submits them),
# so those workers would only cost CPU and memory on every task start. This does not make
# the warm worker survive between tasks: that depends on the owner actor's creating job
# staying alive (see benchmarks/results/chain10*.md and benchmarks/worker_reuse.py).
RAY_SYSTEM_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0"}
_STATE_VERSION = 1


class LocalClusterError(RuntimeError):
    """The embedded Ray head could not be started, found or stopped."""


@dataclass(frozen=True)
class LocalClusterState:
    """What the state file records about a running embedded head."""

    address: str
    gcs_port: int
    session_id: int
    temp_dir: str
    dashboard_url: str | None
    started_at: float
    version: int = _STATE_VERSION
    client_address: str | None = None  # Ray Client (ray://); absent in state files written before it


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


# Never handed out, even if the OS offers them: Redis's and the Airflow API server's usual ports.
RESERVED_PORTS = frozenset({6379, 8080})


def free_ports(count: int) -> list[int]:
    """Reserve ``count`` distinct free TCP ports on loopback (released on return), none of RESERVED_PORTS."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)  # a reserved port stays held too, so it is not offered again
            if sock.getsockname()[1] not in RESERVED_PORTS:
                ports.append(sock.getsockname()[1])
        return ports
    finally:
        for sock in sockets:
            sock.close()


def ray_process_env() -> dict[str, str]:
    """The environment for Ray processes this package starts (heads, joined nodes, probe drivers).

    Ray turns token auth on for a new node whenever ~/.ray/auth_token exists (any earlier ray.init()
    writes one) and RAY_AUTH_MODE is unset; clients that do not send the token are then refused. So one
    mode is set explicitly: the user's RAY_AUTH_MODE if given (``token`` opts in), else ``disabled``.
    """
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalRayCluster:
    """A Ray head started with ``ray start`` and tracked by a state file.

    ``home`` holds the state and lock files (default ``$AIRFLOW_HOME/ray``).
    Ray's own temp dir lives under ``/tmp`` with a short name, because Ray's
    unix socket paths must stay under 108 characters.
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
    ) -> None:
        self.home = Path(home) if home is not None else airflow_home() / "ray"
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

    # -- state -----------------------------------------------------------------
    def read_state(self) -> LocalClusterState | None:
        """The recorded head, validated; ``None`` when there is none."""
        try:
            raw = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LocalClusterError(f"Malformed state file {self.state_file}: {exc!r}") from exc
        if state.version != _STATE_VERSION or not 0 < state.gcs_port < 65536:
            raise LocalClusterError(f"Malformed state file {self.state_file}: {raw!r}")
        return state

    def _write_state(self, state: LocalClusterState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2))
        os.replace(tmp, self.state_file)

    def is_alive(self, state: LocalClusterState) -> bool:
        return bool(self._session_processes(state.session_id)) and port_open("127.0.0.1", state.gcs_port)

    def status(self) -> LocalClusterState | None:
        """The running head, or ``None`` (a stale state file counts as none)."""
        state = self.read_state()
        if state is None or not self.is_alive(state):
            return None
        return state

    # -- lifecycle -------------------------------------------------------------
    def ensure_running(self) -> LocalClusterState:
        """Return the running head, starting it first if needed (safe across processes)."""
        state = self.status()
        if state is not None:
            return state
        self.home.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_file), timeout=START_TIMEOUT_S + 30):
            state = self.status()  # another process may have started it while we waited
            if state is not None:
                return state
            stale = self.read_state()
            if stale is not None:
                self._kill_session(stale.session_id)
            return self._start()

    def _start(self) -> LocalClusterState:
        (gcs, client, agent_listen, agent_grpc, runtime_env_agent, metrics, dashboard, node_manager,
         object_manager) = free_ports(9)
        ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
        if ray_bin is None:
            raise LocalClusterError("The `ray` command was not found; install ray[default] in this environment")
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
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={self.temp_dir}",
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
        env = {**ray_process_env(), **RAY_SYSTEM_ENV}
        with open(self.log_file, "ab") as log:
            # A new session detaches the head from the caller: killing the Airflow
            # task that happened to start it must not take the cluster down.
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill_session(proc.pid)
                raise LocalClusterError(
                    f"`ray start --head` did not finish within {START_TIMEOUT_S:.0f}s; see {self.log_file}"
                ) from None
        if rc != 0 or not port_open("127.0.0.1", gcs, timeout=5):
            self._kill_session(proc.pid)
            raise LocalClusterError(f"`ray start --head` failed (exit code {rc}); see {self.log_file}")
        state = LocalClusterState(
            address=f"127.0.0.1:{gcs}",
            gcs_port=gcs,
            session_id=proc.pid,
            temp_dir=str(self.temp_dir),
            dashboard_url=f"http://127.0.0.1:{dashboard}" if self.include_dashboard else None,
            started_at=time.time(),
            client_address=f"ray://127.0.0.1:{client}",
        )
        self._write_state(state)
        return state

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the recorded head (only its own processes, unlike ``ray stop``)."""
        self.home.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_file), timeout=START_TIMEOUT_S + 30):
            state = self.read_state()
            if state is None:
                return False
            stopped = self._kill_session(state.session_id, timeout=timeout)
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
            if stopped:
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

    def _kill_session(self, session_id: int, timeout: float = 30.0) -> bool:
        """SIGTERM, a short grace (``gcs_server`` ignores SIGTERM), then SIGKILL what is left."""
        procs = self._session_processes(session_id)
        for sig, wait in ((signal.SIGTERM, min(3.0, timeout)), (signal.SIGKILL, timeout)):
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
            _, procs = psutil.wait_procs(procs, timeout=wait)
            if not procs:
                break
        return not procs
