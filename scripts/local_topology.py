"""docker-compose.yaml's topology on loopback, without Docker: Airflow components, Celery workers, Ray nodes.

Used by the system tests (tests/system/test_scheduler_postgres.py, operators/test_durable.py,
triggers/test_deferrable.py; its Celery deployment by deployment/test_netns_topology.py) and
runnable by hand against the PostgreSQL and Redis of this machine::

    python scripts/local_topology.py --pg-db airflow_ray_demo --workdir /tmp/topology

starts a Ray head plus a second Ray node joined with ``ray start --address`` (resources ``head_node``
and ``worker_node``, as in docker-compose.yaml; the head is ``loopback_only=False``, since a joining node
cannot reach a loopback-only head, but keeps token auth: the node and every driver present its token),
then ``airflow api-server``, ``scheduler``, ``dag-processor`` and two Celery workers on the example DAGs
(checkpoints under the workdir: both nodes share this disk), prints where everything is, and stops it all
on Ctrl-C. The test points the checkpoints at its SeaweedFS S3 server instead. Every port is a free one;
6379 (Redis) and 8080 are never taken (``local_cluster.free_ports``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from airflow_ray_provider.local_cluster import LocalRayCluster, free_ports, ray_process_env

ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_LINES = 60
WORKER_NAME_ENV = "AIRFLOW_RAY_TOPOLOGY_WORKER"


def worker_hostname() -> str:
    """``[core] hostname_callable`` for Celery workers sharing one host: the task instance records which one."""
    return f"{socket.getfqdn()}/{os.environ.get(WORKER_NAME_ENV, 'worker')}"


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Component:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            text = [f"<cannot read {self.log}: {exc}>"]
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        return f"===== {self.name} ({state}), last {lines} lines of {self.log} =====\n" + "\n".join(text)


def start(name: str, argv: list[str], env: dict[str, str], logs: Path, cwd: Path) -> Component:
    """Start ``argv`` in its own session (so it and its children can be stopped as one), logging to a file."""
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Component(name, proc, log)


def start_airflow(name: str, args: list[str], env: dict[str, str], logs: Path, cwd: Path) -> Component:
    return start(name, [sys.executable, "-m", "airflow", *args], env, logs, cwd)


def stop_all(components: list[Component], timeout: float = 20.0,
             sig_first: signal.Signals = signal.SIGTERM) -> list[psutil.Process]:
    """Signal every component's process group (and descendants that left it), then SIGKILL what remains.

    All components are signalled together so their graceful shutdowns overlap. Returns survivors (none expected).
    """
    family: list[psutil.Process] = []
    for component in components:
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(component.proc.pid)
            family += [leader, *leader.children(recursive=True)]
    for sig in dict.fromkeys((sig_first, signal.SIGKILL)):
        for component in components:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(component.proc.pid, sig)  # start_new_session=True: group id == leader pid
        for member in family:
            with contextlib.suppress(psutil.Error):
                member.send_signal(sig)
        _, family = psutil.wait_procs(family, timeout=timeout / 2)
        if not family:
            break
    for component in components:
        with contextlib.suppress(subprocess.TimeoutExpired):
            component.proc.wait(timeout=5)  # reap, so no zombie is left behind
    return family


def wait_until(what: str, check: Callable[[], Any], timeout: float, components: list[Component],
               diagnostics: Callable[[], str], interval: float = 2.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` if a component dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        dead = [c for c in components if c.proc.poll() is not None]
        if dead:
            raise TopologyError(f"{', '.join(c.name for c in dead)} exited while waiting for {what}\n\n"
                                f"{diagnostics()}")
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TopologyError(f"timed out after {timeout:.0f}s waiting for {what}\n\n{diagnostics()}")
        time.sleep(interval)


class TopologyError(RuntimeError):
    pass


# -- REST ---------------------------------------------------------------------------------------
class Api:
    def __init__(self, base: str, diagnostics: Callable[[], str]) -> None:
        self.base = base.rstrip("/")
        self.token: str | None = None
        self.diagnostics = diagnostics  # appended to every failure

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.call(method, path, body)
        if status >= 300:
            raise AssertionError(f"{method} {path} -> HTTP {status}: {payload}\n\n{self.diagnostics()}")
        return payload

    def healthy(self) -> bool:
        try:
            return self.call("GET", "/api/v2/monitor/health")[0] == 200
        except OSError:
            return False

    def has_dag(self, dag_id: str) -> bool:
        try:
            return self.call("GET", f"/api/v2/dags/{dag_id}")[0] == 200
        except OSError:
            return False

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        """The run's state once it is final, else ``None`` (a failed poll counts as not yet)."""
        try:
            status, payload = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        except OSError:
            return None
        state = payload.get("state") if status == 200 and isinstance(payload, dict) else None
        return state if state in ("success", "failed") else None

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        self.ok("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run_id = f"{dag_id}_{secrets.token_hex(4)}"
        self.ok("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"dag_run_id": run_id, "logical_date": None,
                                                           "conf": conf or {}})
        return run_id


# -- Airflow ------------------------------------------------------------------------------------
@dataclass
class Airflow:
    """An Airflow deployment of subprocesses sharing one metadata DB: api-server, scheduler, dag-processor, workers."""

    home: Path
    dags: Path
    db_url: str
    executor: str = "LocalExecutor"
    extra_env: dict[str, str] = field(default_factory=dict)
    components: list[Component] = field(default_factory=list)
    port: int = field(default_factory=lambda: free_ports(1)[0])
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    queue: str = field(default_factory=lambda: f"airflow_ray_{secrets.token_hex(4)}")

    def __post_init__(self) -> None:
        self.logs = self.home / "component-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.api = Api(f"http://127.0.0.1:{self.port}", self.diagnostics)

    @property
    def env(self) -> dict[str, str]:
        from cryptography.fernet import Fernet

        passwords = self.home / "simple_auth_manager_passwords.json"
        if not passwords.exists():
            passwords.write_text(json.dumps({"tester": self.password}))
            (self.home / "fernet").write_text(Fernet.generate_key().decode())
        return {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            # One bundle, the DAGs folder (Airflow's default), whatever the calling environment configured.
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps([{
                "name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                "kwargs": {}}]),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url,
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__FERNET_KEY": (self.home / "fernet").read_text(),
            "AIRFLOW__API_AUTH__JWT_SECRET": f"jwt-{self.password}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "tester:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            # Celery: a queue of our own on the shared Redis, so other users of that broker are untouched.
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "scripts.local_topology.worker_hostname",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **self.extra_env,
        }

    def migrate(self) -> None:
        done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env, cwd=self.home,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise TopologyError(f"airflow db migrate failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")

    def start_triggerer(self, name: str = "triggerer") -> Component:
        """A triggerer (deferred tasks); started on its own so a test can kill it and start another."""
        component = start_airflow(name, ["triggerer"], self.env, self.logs, self.home)
        self.components.append(component)
        return component

    def start(self, celery_workers: int = 0, startup_timeout: float = 150.0, triggerer: bool = False) -> None:
        env = self.env
        if triggerer:
            self.start_triggerer()
        self.components.append(start_airflow("api-server", ["api-server", "--host", "127.0.0.1", "--port",
                                                            str(self.port), "--workers", "1"], env, self.logs,
                                             self.home))
        self.components.append(start_airflow("scheduler", ["scheduler"], env, self.logs, self.home))
        self.components.append(start_airflow("dag-processor", ["dag-processor"], env, self.logs, self.home))
        for n in range(1, celery_workers + 1):
            name = f"celery-worker-{n}"
            self.components.append(start_airflow(
                name, ["celery", "worker", "--queues", self.queue, "--concurrency", "1",
                       "--celery-hostname", f"{name}@%h", "--without-mingle", "--without-gossip"],
                {**env, WORKER_NAME_ENV: name}, self.logs, self.home))
        self.wait("the API server", self.api.healthy, startup_timeout)
        self.api.token = self.api.ok("POST", "/auth/token", {"username": "tester",
                                                             "password": self.password})["access_token"]

    def wait(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
        return wait_until(what, check, timeout, self.components, self.diagnostics, interval)

    def diagnostics(self) -> str:
        """The task and trigger logs, the last written first, then each component's: CI keeps only the start
        and the end of a long failure, and the log of what the test last waited on is usually the one to read."""
        parts = []
        task_logs = list((self.home / "logs").rglob("*.log")) if (self.home / "logs").exists() else []
        for task_log in sorted(task_logs, key=lambda p: p.stat().st_mtime, reverse=True):
            lines = task_log.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"===== {task_log.relative_to(self.home)} (last 30 lines) =====\n" + "\n".join(lines))
        return "\n\n".join(parts + [c.tail() for c in self.components])

    def stop(self) -> list[psutil.Process]:
        return stop_all(self.components)


def celery_airflow(home: Path, pg_db: str, broker_url: str, ray_extra: dict[str, Any],
                   pg_server: str = "postgres@127.0.0.1:5432", ray_password: str | None = None) -> Airflow:
    """docker-compose.yaml's Airflow: CeleryExecutor on ``broker_url``, the PostgreSQL database ``pg_db``
    as metadata DB and Celery result backend, the Ray XCom backend, ``ray_default`` with ``ray_extra``
    and, as its password, ``ray_password`` (the head's token, ``LocalRayCluster.auth_token()``).

    Like docker-compose.yaml, every component gets the same explicit ``[ray] secret_key`` (a fresh one; a
    client outside the deployment verifies references with ``extra_env["AIRFLOW__RAY__SECRET_KEY"]``)."""
    ray_conn: dict[str, Any] = {"conn_type": "ray", "extra": ray_extra}
    if ray_password:
        ray_conn["password"] = ray_password
    return Airflow(home=home, dags=ROOT / "example_dags", executor="CeleryExecutor",
                   db_url=f"postgresql+psycopg2://{pg_server}/{pg_db}", extra_env={
                       "AIRFLOW__CELERY__BROKER_URL": broker_url,
                       "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{pg_server}/{pg_db}",
                       "AIRFLOW__CORE__XCOM_BACKEND": "airflow_ray_provider.xcom.RayXComBackend",
                       "AIRFLOW_CONN_RAY_DEFAULT": json.dumps(ray_conn),
                       "AIRFLOW__RAY__SECRET_KEY": secrets.token_hex(32),
                   })


# -- Ray ----------------------------------------------------------------------------------------
def start_ray_node(head_address: str, name: str, resources: dict[str, float], num_cpus: int,
                   logs: Path, auth_token: str | None = None) -> Component:
    """Join a Ray node to ``head_address`` with ``ray start --address`` (blocking, in its own session).

    ``auth_token``: the head's token (``LocalRayCluster.auth_token()``); the head must be started with
    ``loopback_only=False``, because a loopback-only head cannot be joined.
    """
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    ports = free_ports(6)  # distinct: each is held until all six are chosen
    argv = [
        ray_bin, "start", f"--address={head_address}", "--block", f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(resources)}", f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}", f"--runtime-env-agent-port={ports[4]}",
        f"--metrics-export-port={ports[5]}", "--disable-usage-stats",
    ]
    return start(name, argv, ray_process_env(auth_token), logs, logs)


def join_ray_node(head_address: str, name: str, resources: dict[str, float], num_cpus: int, logs: Path,
                  auth_token: str | None = None, timeout: float = 240.0) -> tuple[Component, list[dict[str, Any]]]:
    """``start_ray_node`` and wait until the head lists it: the node and every live node of the cluster.

    A node that exits before it is listed is started once more: its ports were free when chosen but are
    released before ``ray start`` binds them, so another process can take one in between. A second exit,
    or no listing within ``timeout``, fails with the node's own log (the Airflow components are not up yet).
    """
    expected = 1 + len(ray_nodes(head_address, auth_token))
    for attempt in (1, 2):
        node = start_ray_node(head_address, name, resources, num_cpus, logs, auth_token)

        def listed() -> list[dict[str, Any]] | None:
            nodes = ray_nodes(head_address, auth_token)  # one throwaway driver per poll
            return nodes if len(nodes) >= expected else None

        try:
            return node, wait_until(f"the Ray node {name} to join {head_address}", listed, timeout, [node],
                                    node.tail, interval=3)
        except TopologyError as exc:
            if node.proc.poll() is None or attempt == 2:
                stop_all([node])
                raise
            print(f"{exc}\n\nstarting {name} once more (a port it was given may have been taken)", file=sys.stderr)
            node.log.rename(node.log.with_suffix(".first.log"))
    raise AssertionError("unreachable")


def ray_nodes(address: str, auth_token: str | None = None) -> list[dict[str, Any]]:
    """The cluster's live nodes as Ray reports them (from a throwaway driver, so this process stays clean),
    asked with ``auth_token`` (the head's token)."""
    code = ("import json, ray; ray.init(address=__import__('sys').argv[1], log_to_driver=False); "
            "print('NODES ' + json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'resources': n['Resources']} "
            "for n in ray.nodes()]))")
    done = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120,
                          env=ray_process_env(auth_token))
    if done.returncode != 0:
        raise TopologyError(f"cannot list the nodes of {address}: {done.stderr[-2000:]}")
    return [n for n in marked_nodes(done.stdout) if n["alive"]]


def marked_nodes(stdout: str) -> list[dict[str, Any]]:
    """The JSON after ``NODES `` in a driver's output: Ray's own log lines (raylet warnings) may follow it."""
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith("NODES ")), None)
    if line is None:
        raise TopologyError(f"no node list in the driver's output: {stdout[-2000:]}")
    return json.loads(line[len("NODES "):])


# -- by hand ------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-db", required=True, help="an existing, empty PostgreSQL database at 127.0.0.1:5432")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--celery-workers", type=int, default=2)
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    # loopback_only=False: the second node joins with `ray start --address`, which a loopback-only head refuses.
    head = LocalRayCluster(args.workdir / "ray-head", num_cpus=2, resources={"head_node": 1}, loopback_only=False)
    state = head.ensure_running()
    token = head.auth_token()
    if token is None:
        head.stop()
        raise SystemExit("The Ray head started without token auth (RAY_AUTH_MODE=disabled?); refusing to run "
                         "a head that listens beyond loopback without it")
    node, _ = join_ray_node(state.address, "ray-worker", {"worker_node": 1}, 2, args.workdir, auth_token=token)
    airflow = celery_airflow(args.workdir / "airflow", args.pg_db, "redis://127.0.0.1:6379/0",
                             {"address": state.address, "checkpoint_path": str(args.workdir / "checkpoints")},
                             ray_password=token)
    try:
        airflow.migrate()
        airflow.start(celery_workers=args.celery_workers)
        print(f"Airflow API/UI: {airflow.api.base} (tester / {airflow.password}); Celery queue {airflow.queue}")
        print(f"Ray: head {state.address}, dashboard {state.dashboard_url or 'off'}; second node log {node.log}")
        print("Ctrl-C stops everything.")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    finally:
        airflow.stop()
        stop_all([node])
        head.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
