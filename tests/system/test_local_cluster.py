"""The embedded Ray head: one per home, safe under concurrent first callers, stoppable on its own."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from airflow_ray_provider.local_cluster import (
    LOOPBACK_ONLY_ENV,
    START_PRIORITY_BOOST,
    LocalClusterState,
    LocalRayCluster,
    _group_nice,
    listening_sockets,
    port_open,
    read_token_file,
    user_cache_dir,
)
from tests.support.heads import file_mode, forge_state

# Its module-scoped fixtures stay in one lane.
pytestmark = pytest.mark.timeout(600)


def _count(cluster: LocalRayCluster, name: str, session_id: int) -> int:
    return sum(p.name() == name for p in cluster._session_processes(session_id))


def test_concurrent_first_callers_start_exactly_one_head_and_a_saved_ray_token_does_not_lock_them_out(
        tmp_path: Path) -> None:
    """Four processes' first calls at once (three ``LocalRayCluster.ensure_running()``, one task process's
    ``RayHook().get_conn()`` that then runs a Ray task) start one head between them.

    They run as a user whose earlier ``ray.init()`` left ``~/.ray/auth_token``: ``ray start`` then turns token
    auth on unless told otherwise, and a client without the token was refused. The embedded head stays
    reachable. (One test for both: each head start here costs about 20 CPU-seconds.)
    """
    user = tmp_path / "user"
    (user / ".ray").mkdir(parents=True)
    (user / ".ray" / "auth_token").write_text("a" * 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # The port registry stays the machine's (it is under the user's cache): other lanes' heads hold ports too.
    env.update(HOME=str(user), AIRFLOW_HOME=str(tmp_path / "airflow"), XDG_CACHE_HOME=str(user_cache_dir().parent))
    env.pop("AIRFLOW_CONN_RAY_DEFAULT", None)  # no connection: the embedded head
    home = tmp_path / "airflow" / "ray"
    starter = ("import sys; from airflow_ray_provider.local_cluster import LocalRayCluster; "
               "print(LocalRayCluster(sys.argv[1], num_cpus=1).ensure_running().address)")
    driver = ("import ray; from airflow_ray_provider.hooks.ray import RayHook; RayHook().get_conn(); "
              "print('sum', ray.get(ray.remote(lambda: 40 + 2).remote()))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for code in (starter, starter, driver, starter)]
    cluster = LocalRayCluster(home)
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
        start_log = cluster.log_file.read_text(errors="replace") if cluster.log_file.exists() else "<no log>"
        assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs] + [start_log[-5000:]]
        (hook_out, _) = outputs.pop(2)
        assert "sum 42" in hook_out, hook_out
        addresses = {out.strip() for out, _ in outputs}
        assert len(addresses) == 1, addresses
        state = cluster.status()
        assert state is not None and state.address in addresses
        assert state.gcs_port != 6379
        assert _count(cluster, "gcs_server", state.session_id) == 1
        assert _count(cluster, "raylet", state.session_id) == 1
        # No process of the head is told one of Ray's fixed default ports (other services hold them).
        fixed = re.compile(r"(?:port|address)[=:](?:\S*:)?(6379|8265|10001|52365)\b")
        told = [" ".join(p.cmdline()) for p in cluster._session_processes(state.session_id)]
        assert not [c for c in told if fixed.search(c)], [c for c in told if fixed.search(c)]
        # The head is not tied to the processes that started it: they have all exited.
        assert port_open("127.0.0.1", state.gcs_port)
    finally:
        assert cluster.stop()
    assert cluster.status() is None
    assert not port_open("127.0.0.1", state.gcs_port)


def test_cli_start_status_stop(tmp_path: Path) -> None:
    # Without RAY_AUTH_* that this process may carry from an earlier connection (RayHook sets them).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}, "AIRFLOW_HOME": str(tmp_path)}
    cli = [sys.executable, "-m", "airflow_ray_provider.cli", "local"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=240)

    assert run("status").returncode == 3
    started = run("start", "--num-cpus", "1", "--json")
    try:
        assert started.returncode == 0, started.stderr
        state = json.loads(started.stdout)
        status = run("status")
        assert status.returncode == 0 and state["address"] in status.stdout
        assert f"Ray Client: {state['client_address']}" in status.stdout
        assert state["client_address"].startswith("ray://127.0.0.1:")
        assert (tmp_path / "ray" / "local-cluster.json").exists()
        assert f"auth: token in {tmp_path / 'ray' / 'auth-token'}" in status.stdout
        assert read_token_file(tmp_path / "ray" / "auth-token") not in status.stdout + started.stdout
        # Its raylet killed (OOM, a person): the head has no node. Status says so, and the next start
        # replaces it instead of handing out a GCS that would leave every driver waiting for a node.
        (raylet,) = [m["pid"] for m in state["processes"] if m["name"] == "raylet"]
        os.kill(raylet, signal.SIGKILL)
        psutil.wait_procs([psutil.Process(raylet)], timeout=30)
        status = run("status")
        assert status.returncode == 3, status.stdout + status.stderr
        assert f"not running: its raylet (pid {raylet}) exited, so it has no node" in status.stdout
        again = run("start", "--num-cpus", "1", "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["address"] != state["address"]
        assert "does not serve: its raylet" in again.stderr  # the warning says why a new head started
        assert run("status").returncode == 0
    finally:
        stopped = run("stop")
    assert stopped.stdout.strip() == "stopped"
    assert run("status").stdout.strip() == "not running"


# -- the head is private to its user ---------------------------------------------------------------
_DRIVER = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("sum", ray.get(ray.remote(lambda: 40 + 2).remote()))
"""


def _env_without_ray_auth(tmp_path: Path) -> dict[str, str]:
    """A user's environment with no token anywhere: no RAY_AUTH_* and a HOME without ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "AIRFLOW_CONN_RAY"))}
    (tmp_path / "user").mkdir(exist_ok=True)
    return {**env, "HOME": str(tmp_path / "user")}


@pytest.fixture(scope="module")
def private_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRayCluster, LocalClusterState]]:
    """One embedded head for the checks below, started as ``RayHook`` would (``$AIRFLOW_HOME/ray``)."""
    airflow_home = tmp_path_factory.mktemp("private-head")
    cluster = LocalRayCluster(airflow_home / "ray", num_cpus=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    with pytest.MonkeyPatch.context() as scoped:  # the default: no RAY_AUTH_MODE in the environment
        for name in [k for k in os.environ if k.startswith("RAY_AUTH")]:
            scoped.delenv(name)
        assert env.keys() == os.environ.keys()
        state = cluster.ensure_running()
    try:
        yield cluster, state
    finally:
        cluster.stop()


def _non_loopback_sockets(cluster: LocalRayCluster, state: LocalClusterState) -> list[tuple[str, int, str]]:
    """Sockets the head's processes listen on anywhere but loopback (127.0.0.1, or its IPv4-mapped form)."""
    sockets = listening_sockets(cluster._session_processes(state.session_id))
    return [s for s in sockets if s[0] not in ("127.0.0.1", "::ffff:127.0.0.1")]


def test_head_listens_on_loopback_only(private_head: tuple[LocalRayCluster, LocalClusterState]) -> None:
    cluster, state = private_head
    procs = cluster._session_processes(state.session_id)
    sockets = listening_sockets(procs)
    print("listening:", *(f"{ip}:{port} {name}" for ip, port, name in sockets), sep="\n  ")
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    pids = {f"pid={p.pid}," for p in procs}
    print("ss -ltnp:", *(line for line in ss if any(pid in line for pid in pids)), sep="\n  ")
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert state.gcs_port in {port for _, port, _ in sockets}
    assert state.client_address is not None
    assert int(state.client_address.rsplit(":", 1)[1]) in {port for _, port, _ in sockets}  # Ray Client too
    # Only loopback: 127.0.0.1, or its IPv4-mapped form on a dual-stack socket; never 0.0.0.0, ::, * or the LAN.
    assert not [s for s in sockets if s[0] not in ("127.0.0.1", "::ffff:127.0.0.1")], sockets


def _serves_ray_metrics(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.status == 200 and b"ray_" in response.read(1 << 20)
    except Exception:  # noqa: BLE001 - a gRPC port, a refusal, a timeout: no metrics from it
        return False


def test_no_port_of_the_head_serves_metrics_without_the_token(
        private_head: tuple[LocalRayCluster, LocalClusterState]) -> None:
    """Ray's Prometheus endpoint answers without the token, and the owners' metric names carry every DAG, run
    and task id: the embedded head does not export metrics (unless the user's environment turns them on)."""
    cluster, state = private_head
    ports = sorted({port for _, port, _ in listening_sockets(cluster._session_processes(state.session_id))})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        serving = [port for port, yes in zip(ports, pool.map(_serves_ray_metrics, ports), strict=True) if yes]
    assert ports and not serving, f"ports {serving} of {ports} serve Ray's metrics to anyone on this host"
    # The dashboard process and the autoscaler monitor serve metrics on fixed ports that only the machine's first
    # head gets (run 11 of benchmarks/results/suite_tiers.md: this head had 44227), so the probe above alone
    # passes whenever another head holds them. Each says in its log which port it tried.
    logs = Path(state.temp_dir) / "ray" / "session_latest" / "logs"
    for log, server in (("dashboard.log", "dashboard"), ("monitor.log", "autoscaler")):
        text = (logs / log).read_text(errors="replace")
        assert f"Starting {server} metrics server on port -1" in text, text[-3000:]


def test_a_driver_without_the_token_is_refused_and_ray_hook_brings_it(
        private_head: tuple[LocalRayCluster, LocalClusterState], tmp_path: Path) -> None:
    cluster, state = private_head
    env = {**_env_without_ray_auth(tmp_path), **LOOPBACK_ONLY_ENV}  # reaches the loopback GCS, sends no token
    bare = subprocess.run([sys.executable, "-c", _DRIVER, state.address], capture_output=True, text=True,
                          env=env, timeout=180)
    assert bare.returncode != 0 and "sum 42" not in bare.stdout, bare.stdout[-2000:]
    assert re.search(r"(?i)auth|token", bare.stderr), bare.stderr[-3000:]
    wrong = subprocess.run([sys.executable, "-c", _DRIVER, state.address], capture_output=True, text=True,
                           env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, timeout=180)
    assert wrong.returncode != 0 and "sum 42" not in wrong.stdout, wrong.stdout[-2000:]

    # What a `local` connection does: RayHook reads the token from the head's 0600 file and sends it.
    env["AIRFLOW_HOME"] = str(cluster.home.parent)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # RayHook sets what it needs itself
    code = ("import ray; from airflow_ray_provider.hooks.ray import RayHook; hook = RayHook(); hook.get_conn(); "
            "print('address', ray.get_runtime_context().gcs_address); "
            "print('sum', ray.get(ray.remote(lambda: 40 + 2).remote()))")
    hooked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert hooked.returncode == 0 and "sum 42" in hooked.stdout, hooked.stderr[-3000:]
    assert f"address {state.address}" in hooked.stdout
    assert cluster.auth_token() == read_token_file(cluster.token_file)
    for text in (bare.stdout, bare.stderr, hooked.stdout, hooked.stderr):
        assert read_token_file(cluster.token_file) not in text


def test_the_keeper_joins_with_the_token_and_logs_privately(
        private_head: tuple[LocalRayCluster, LocalClusterState], tmp_path: Path) -> None:
    """The keeper driver is started inside the cluster (by a Ray worker): it must reach the loopback GCS and
    present the token too, and its log must not be a predictable, world-readable file in /tmp."""
    cluster, state = private_head
    env = {**_env_without_ray_auth(tmp_path), "AIRFLOW_HOME": str(cluster.home.parent)}
    code = ("from airflow_ray_provider.cluster import owner; from airflow_ray_provider.hooks.ray import RayHook; "
            "RayHook().get_conn(); owner.get_owner('private-head', 0); "
            "print('keeper', owner._factory_or_none() is not None)")
    before = set(Path(tempfile.gettempdir()).glob("airflow-ray-keeper-*"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0 and "keeper True" in proc.stdout, proc.stderr[-3000:]
    assert set(Path(tempfile.gettempdir()).glob("airflow-ray-keeper-*")) == before
    logs = sorted({p.resolve() for p in cluster.ray_temp_dir.glob("session_*/logs/airflow-ray-keeper-*.log")})
    assert len(logs) == 1 and file_mode(logs[0]) == 0o600, [(p, oct(file_mode(p))) for p in logs]
    assert "keeper ready" in logs[0].read_text()
    # Now with Ray workers, the owner actor and the keeper driver running: they listen on loopback only too.
    procs = cluster._session_processes(state.session_id)
    assert any("airflow_ray_provider.cluster.keeper" in " ".join(p.cmdline()) for p in procs)
    assert not _non_loopback_sockets(cluster, state), listening_sockets(procs)


def test_token_state_logs_and_temp_dirs_are_private(private_head: tuple[LocalRayCluster, LocalClusterState]) -> None:
    cluster, state = private_head
    assert state.auth_mode == "token" and state.token_file == str(cluster.token_file)
    assert len(read_token_file(cluster.token_file)) == 64
    for path in (cluster.token_file, cluster.state_file, cluster.log_file):
        assert file_mode(path) == 0o600, (path, oct(file_mode(path)))
    assert file_mode(cluster.home) == 0o700
    assert read_token_file(cluster.token_file) not in cluster.state_file.read_text()
    temp = Path(state.temp_dir)
    assert temp == cluster.temp_dir and file_mode(temp) == 0o700 and os.lstat(temp).st_uid == os.getuid()
    sessions = [p for p in cluster.ray_temp_dir.glob("session_*") if not p.is_symlink()]
    assert sessions, list(cluster.ray_temp_dir.iterdir())
    # Ray chmods its own dirs 0777 (again in every worker), so the 0700 dir around them is what counts.
    # The files the head's processes write are the user's alone (umask 077 for the head and all it starts);
    # drivers (Airflow task processes) write theirs with their own umask, still inside the 0700 dir.
    logs = sessions[0] / "logs"
    head_logs = [p for pattern in ("gcs_server.*", "raylet.*", "dashboard_agent*", "runtime_env_agent*",
                                   "worker-*", "python-core-worker-*") for p in logs.glob(pattern)]
    assert {p.name.split(".")[0] for p in head_logs} >= {"gcs_server", "raylet"}, sorted(logs.iterdir())
    readable = [f"{p} {oct(file_mode(p))}" for p in head_logs if file_mode(p) & 0o044]
    assert not readable, readable[:20]
    if os.getuid() == 0:  # prove it as another user: neither the session dir nor a log can be reached
        for path in (sessions[0], sessions[0] / "logs" / "raylet.out"):
            other = subprocess.run(["cat" if path.is_file() else "ls", str(path)], capture_output=True,
                                   text=True, user=65534, group=65534, extra_groups=[], timeout=30)
            assert other.returncode != 0 and "Permission denied" in other.stderr, (path, other)


def test_stale_state_naming_an_unrelated_session_is_discarded_not_signalled(
        tmp_path: Path, unrelated_process: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture) -> None:
    cluster = LocalRayCluster(tmp_path / "ray", num_cpus=1)
    forge_state(cluster, unrelated_process.pid)  # what an older version wrote: a bare session id
    with caplog.at_level(logging.WARNING, logger="airflow_ray_provider.local_cluster"):
        state = cluster.ensure_running()
    try:
        assert unrelated_process.poll() is None, "the unrelated process was killed"
        assert f"Discarding stale state file {cluster.state_file} (session {unrelated_process.pid})" in caplog.text
        assert "no process was signalled" in caplog.text
        assert state.session_id != unrelated_process.pid and cluster.status() == state  # a new head
    finally:
        assert cluster.stop()
    assert unrelated_process.poll() is None


def test_a_failed_start_is_tried_again_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``ray start`` fails the way Ray's fixed startup windows fail it on a loaded machine; the next attempt runs,
    at a raised priority that the head's processes lose once it is up (START_PRIORITY_BOOST).

    The failure is made by a wrapper around the real ``ray`` command that fails once, printing Ray's own
    message: a real slow raylet cannot be produced on demand (benchmarks/head_start_load.py makes one with busy
    sessions, in minutes). The wrapper also records the nice levels it runs at, once they are raised (10 s at most).
    """
    real_ray = Path(sys.executable).with_name("ray")
    marker, wrapper, levels = tmp_path / "failed-once", tmp_path / "ray", tmp_path / "levels"
    # The head's own session is a new CPU group, created at nice 0, where the kernel has autogroups; the caller's
    # may be in none (CI ran this in a session older than autogroup: its file was empty, the head's "nice 0").
    nice, group_nice = os.getpriority(os.PRIO_PROCESS, 0), 0 if Path("/proc/self/autogroup").exists() else None
    wrapper.write_text(f"#!/bin/sh\nif [ ! -e {marker} ]; then touch {marker}; echo 'Exception: The current node "
                       f"timed out during startup. This could happen because some of the raylet failed to startup or "
                       f"the GCS has become overloaded.'; exit 1; fi\n"
                       f"i=0; while [ \"$(nice)\" = {nice} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
                       f"echo \"$(nice) $(cut -sd' ' -f3 /proc/self/autogroup 2>/dev/null)\" > {levels}\n"
                       f"exec {real_ray} \"$@\"\n")
    wrapper.chmod(0o755)
    cluster = LocalRayCluster(tmp_path / "home", num_cpus=1, ray_command=str(wrapper))
    try:
        with caplog.at_level(logging.WARNING, logger="airflow_ray_provider.local_cluster"):
            state = cluster.ensure_running()
        assert marker.exists() and cluster.status() == state
        assert "failed (attempt 1 until 300s have passed" in caplog.text, caplog.text
        assert "The current node timed out during startup" in caplog.text, caplog.text
        # Only root (or CAP_SYS_NICE) may raise a priority; elsewhere the head starts unboosted. Where the kernel
        # has no autogroups, only the process's own level.
        expected = [nice, group_nice] if os.geteuid() != 0 else [
            max(-20, level - START_PRIORITY_BOOST) if level is not None else None for level in (nice, group_nice)]
        assert levels.read_text().split() == [str(level) for level in expected if level is not None]
        head = LocalRayCluster._session_processes(state.session_id)
        assert {proc.name() for proc in head} >= {"raylet", "gcs_server"}
        for proc in head:  # set back, every thread: a worker the raylet forks inherits its thread's level
            assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in proc.threads()} == {nice}, proc
            assert _group_nice(proc.pid) == group_nice, proc
    finally:
        cluster.stop()

