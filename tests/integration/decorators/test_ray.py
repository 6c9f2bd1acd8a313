"""``@task.ray`` through real Airflow (``dag.test()``) on the session's Ray head.

These run with Airflow's default XCom backend: the result comes back into Airflow as a value, the path a
deployment without the Ray XCom backend takes (tests/integration/xcom covers the backend).
"""

from __future__ import annotations

import http.server
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from airflow_ray_provider.cluster.owner import get_owner
from airflow_ray_provider.hooks.ray import RayHook
from tests.dags import core_dags
from tests.support import ROOT
from tests.support.rows import ti_states, xcom_value

pytestmark = pytest.mark.usefixtures("ray_cluster", "default_xcom_backend")


def _log(capfd: pytest.CaptureFixture[str]) -> str:
    out = capfd.readouterr()
    return out.out + out.err


@pytest.mark.smoke
def test_values_flow_between_ray_and_plain_tasks_both_ways() -> None:
    dr = core_dags.flow_both_ways_dag.test()
    assert ti_states(dr) == {("produce", -1): "success", ("plain_sum", -1): "success", ("summarize", -1): "success"}
    # module-level helper, closure variable and in-function import all worked on the worker
    assert xcom_value(dr, "produce") == [7, 17, 27, 37]
    assert xcom_value(dr, "plain_sum") == 88
    assert xcom_value(dr, "summarize") == {"count": 4, "total": 88}  # dataclass built in Ray


def test_mapping_multiple_outputs_override_and_templates() -> None:
    dr = core_dags.mapping_outputs_dag.test()
    states = ti_states(dr)
    assert states and all(state == "success" for state in states.values()), states
    assert [xcom_value(dr, "scale", map_index=i) for i in range(3)] == [10, 20, 30]
    assert xcom_value(dr, "split", key="low") == 10
    assert xcom_value(dr, "split", key="high") == 30
    assert xcom_value(dr, "split", key="run_id") == dr.run_id
    assert xcom_value(dr, "split", key="factor") == 3
    assert xcom_value(dr, "split", key="stamp") == f"{dr.logical_date:%Y-%m-%d}|3"
    assert xcom_value(dr, "where_env") == "t:rt"  # runtime_env from .override()


def test_remote_exception_and_output_reach_the_task_log(capfd: pytest.CaptureFixture[str]) -> None:
    dr = core_dags.remote_failure_dag.test()
    log = _log(capfd)
    assert ti_states(dr) == {("explode", -1): "failed"}
    assert "[ray] about to fail: marker-out" in log
    assert "ValueError: the user's own message 42" in log
    assert "deep_user_frame" in log  # the user's frames from the remote traceback
    assert "Ray task remote_failure.explode failed" in log


def test_native_and_child_process_output_reach_the_task_log_once_and_whole(
        capfd: pytest.CaptureFixture[str]) -> None:
    dr = core_dags.native_output_dag.test()
    log = _log(capfd)
    assert ti_states(dr) == {("noisy", 0): "success", ("noisy", 1): "success"}
    # Each relayed line: "<time> [info ] [ray] <the line> [<logger>] loc=...": keep only the line.
    relayed = [line.split("[ray] ", 1)[1].split(" [airflow.", 1)[0].rstrip()
               for line in log.splitlines() if "[ray] " in line]
    for tag in ("alpha", "beta"):
        for what in ("python-print", "fd1-write", "fd2-write", "c-printf", "child-echo", "child-stderr",
                     "no-newline"):
            found = [line for line in relayed if line.startswith(f"{what} {tag}")]
            assert len(found) == 1, f"{what} {tag}: {found} in\n{log[-4000:]}"  # once: not also through a tee
        bursts = sorted(line for line in relayed if line.startswith(f"burst {tag} "))
        assert bursts == [f"burst {tag} {n:03d} {'x' * 200}" for n in range(300)], bursts[:5]


def test_skip_raised_inside_ray_skips_the_task() -> None:
    assert ti_states(core_dags.remote_skip_dag.test()) == {("maybe", -1): "skipped"}


def _assert_stopped(beat: Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = beat.stat().st_mtime_ns
        time.sleep(1.5)
        if beat.stat().st_mtime_ns == before:
            return
    raise AssertionError(f"{beat} is still being written: the Ray task was not cancelled")


def test_execution_timeout_cancels_the_ray_task(tmp_path: Path) -> None:
    beat, pid_file = tmp_path / "beat", tmp_path / "pid"
    dr = core_dags.timeout_cancels_dag.test(run_conf={"beat": str(beat), "pid": str(pid_file)})
    assert ti_states(dr) == {("forever", -1): "failed"}
    assert beat.exists(), "the Ray task never started"
    _assert_stopped(beat)
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(720)
def test_sigterm_to_the_task_process_cancels_the_ray_task(tmp_path: Path) -> None:
    """Marking a running task failed or stopping its worker sends SIGTERM: Airflow calls on_kill."""
    beat = tmp_path / "beat"
    code = (f"from tests.dags import core_dags; "
            f"core_dags.sigterm_cancels_dag.test(run_conf={{'beat': {str(beat)!r}}})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # A fresh interpreter's first dag.test(): 53-75 s on an idle machine, over 120 s with stress-ng keeping
        # both cores busy beside the suite (run 12 of benchmarks/results/suite_tiers.md), 264 s in run 20 and
        # over 300 s in run 19 (with a second copy of this module running beside the suite).
        deadline = time.monotonic() + 540
        while not beat.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        if not beat.exists():
            proc.kill()
            pytest.fail(f"the Ray task never started: {proc.communicate(timeout=60)[0][-3000:]}")
        proc.send_signal(signal.SIGTERM)
        _assert_stopped(beat, seconds=15)  # well before the 60 s lease could have reaped it
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert "Cancelling Ray task sigterm_cancels.forever" in output, output[-3000:]


def test_unpicklable_callable_names_the_task_and_type(capfd: pytest.CaptureFixture[str]) -> None:
    dr = core_dags.bad_callable_dag.test()
    log = _log(capfd)
    assert ti_states(dr) == {("uses_lock", -1): "failed"}
    assert "Task bad_callable.uses_lock: the callable" in log
    assert "_thread.lock" in log


def test_an_unpicklable_or_generator_return_value_fails_naming_the_task(capfd: pytest.CaptureFixture[str]) -> None:
    dr = core_dags.bad_return_dag.test()
    log = _log(capfd)
    assert ti_states(dr) == {("returns_lock", -1): "failed", ("returns_generator", -1): "failed"}
    assert "Task bad_return.returns_lock: its return value of type _thread.lock cannot be pickled" in log
    assert "Ray task bad_return.returns_generator failed" in log
    assert "The callable returned a generator, which cannot be a task result: Ray would keep only its first " \
           "item" in log


def test_unsatisfiable_resources_fail_fast(capfd: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    dr = core_dags.no_gpu_dag.test()
    elapsed = time.monotonic() - started
    log = _log(capfd)
    assert ti_states(dr) == {("train", -1): "failed", ("custom", -1): "failed"}
    assert "Task no_gpu.train can never run" in log
    assert "GPU=1 (largest node has 0)" in log
    assert "tpu_pod=2 (largest node has 0)" in log
    assert elapsed < 60, f"took {elapsed:.0f}s: infeasible requests must not wait"


def test_context_objects_are_refused_by_name(capfd: pytest.CaptureFixture[str]) -> None:
    dr = core_dags.context_refused_dag.test()
    log = _log(capfd)
    assert ti_states(dr) == {("wants_ti", -1): "failed", ("takes_kwargs", -1): "success"}
    assert "context value 'ti' (RuntimeTaskInstance) cannot be used inside a Ray task" in log
    assert xcom_value(dr, "takes_kwargs") == ["ds", "run_id"]  # portable context items only


def test_unreachable_address_fails_fast_naming_it(connection, capfd: pytest.CaptureFixture[str]) -> None:
    from airflow_ray_provider.local_cluster import free_ports

    (port,) = free_ports(1)
    connection("ray_dead", extra={"address": f"127.0.0.1:{port}"})
    started = time.monotonic()
    dr = core_dags.unreachable_dag.test()
    elapsed = time.monotonic() - started
    log = _log(capfd)
    assert ti_states(dr) == {("never", -1): "failed"}
    assert f"Cannot reach the Ray cluster at 127.0.0.1:{port}" in log
    assert elapsed < 30, f"took {elapsed:.0f}s"


def test_a_slow_runtime_env_says_so_in_the_task_log_and_its_failure_names_the_installer_output(
        capfd: pytest.CaptureFixture[str]) -> None:
    """Ray installs a pip runtime_env before the task starts and reports nothing meanwhile (a failed install is
    tried 3 times): the owner says in the task log that it waits, and on what; then the failure has pip's output.

    The package index is the test's own: it holds its first answer until the notice is in the owner's log
    (a condition, not a clock), then answers 404 to everything, so pip fails at once on each of Ray's tries.
    """
    settings = RayHook().settings
    noticed = threading.Event()

    def notice_logged() -> bool:
        for shard in range(settings.owner_shards):
            owner = get_owner(settings.namespace, shard)
            for key in ray.get(owner.keys.remote(), timeout=60):
                if key.startswith("runtime_env_slow/"):
                    logs = ray.get(owner.poll.remote(key, 0, 0.0), timeout=60)["logs"]
                    if any("Ray is still preparing this task's runtime_env" in line for line in logs):
                        return True
        return False

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            deadline = time.monotonic() + 120
            while not noticed.is_set() and time.monotonic() < deadline:
                if notice_logged():
                    noticed.set()
                else:
                    time.sleep(0.5)
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dr = core_dags.runtime_env_slow_dag.test(
            run_conf={"index_url": f"http://127.0.0.1:{server.server_address[1]}/simple/"})
    finally:
        server.shutdown()
    log = _log(capfd)
    assert ti_states(dr) == {("never_installed", -1): "failed"}, log[-6000:]
    assert noticed.is_set(), log[-6000:]
    notice = log.index("Ray is still preparing this task's runtime_env (pip: airflow-ray-no-such-package) after 10 s")
    assert "runtime_env_setup-" in log[notice:notice + 600]  # where the install's output is on the node
    assert "No matching distribution found for airflow-ray-no-such-package" in log[notice:], log[-6000:]
