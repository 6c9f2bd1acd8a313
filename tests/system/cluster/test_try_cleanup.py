"""A try that does not finish releases what it made in Ray: placement groups and the actors it still holds.

Ray scopes a placement group made inside a task to the task's job, and ours belong to the keeper's
job, which never ends: without cleanup a killed try's placement groups hold their CPUs until the
cluster restarts. Every test here runs on its own 2-CPU head (not the session head), fills it with
one placement group, ends the try some way, then needs both CPUs again within a bounded time.

Each scenario runs in a separate driver process, a stand-in for one Airflow task process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest

from airflow_ray_provider.local_cluster import LOOPBACK_ONLY_ENV, LocalRayCluster, ray_process_env
from tests.support import ROOT

# Its module-scoped fixtures stay in one lane.
pytestmark = pytest.mark.timeout(600)

NAMESPACE = "cleanup"
FREE_WITHIN_S = 30  # a released placement group frees its CPUs within about a second here
TUNE_RETRY_BOUND_S = 480  # the resumed search takes 1-3 minutes here; without the release it never ends

PRELUDE = """
import json, logging, os, signal, sys, time
from pathlib import Path
import ray
from ray.util.placement_group import PlacementGroup
from airflow_ray_provider.submission import RayTaskRun

ray.init(address=sys.argv[1], namespace="cleanup", log_to_driver=False, logging_level="ERROR")
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
log = logging.getLogger("airflow.task")  # what the Airflow task log would show


def hold_both_cpus(marker=None, fail=False):
    '''The callable: a placement group with every CPU of the head, and an actor inside it.

    With ``marker``, the second attempt (the marker exists) returns once it got the CPUs.
    '''
    import os, time
    from pathlib import Path
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(pg.ready(), timeout=60)

    @ray.remote(num_cpus=1)
    class Member:
        def pid(self):
            return os.getpid()

    member = Member.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote()
    ray.get(member.pid.remote())
    if marker is not None and os.path.exists(marker):  # a retry: the CPUs were free again, so this got them
        ray.util.remove_placement_group(pg)
        return "retry finished"
    globals()["KEPT"] = member  # what a sloppy callable does: the handle would outlive a failed try
    print(f"holding pg={pg.id.hex()} actor={member._actor_id.hex()} worker_pid={os.getpid()}", flush=True)
    if marker is not None:
        Path(marker).write_text("first attempt")
    if fail:
        raise RuntimeError("the callable failed while holding its placement group")
    time.sleep(600)


def wait_for_holding(run):
    '''Poll (as RayTaskRun.wait does) until the callable holds both CPUs; return its ids.'''
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = ray.get(run.owner.poll.remote(run.key, 0, 1.0))
        for line in status["logs"]:
            if line.startswith("holding "):
                return dict(part.split("=", 1) for part in line.split()[1:])
        if status["state"] != "running":
            raise RuntimeError(f"the run ended before holding: {status}")
    raise RuntimeError("the callable never got its placement group")


def pg_state(pg_hex):
    return ray.util.placement_group_table(PlacementGroup(ray.PlacementGroupID.from_hex(pg_hex)))["state"]


@ray.remote(num_cpus=2)
def needs_both_cpus():
    return "ran"


def both_cpus_free(timeout):
    try:
        return ray.get(needs_both_cpus.remote(), timeout=timeout) == "ran"
    except ray.exceptions.GetTimeoutError:
        return False


def emit(**values):
    print("RESULT " + json.dumps(values, default=str), flush=True)
"""


class Head(NamedTuple):
    address: str
    env: dict[str, str]  # for driver processes: the head's token, and loopback kept as given
    token: str | None
    session_id: int  # of the head's processes, so a test signals only processes of this head


@pytest.fixture(scope="module")
def small_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A 2-CPU head of its own, like the embedded default on these machines; stopped afterwards."""
    cluster = LocalRayCluster(tmp_path_factory.mktemp("cleanup-ray"), num_cpus=2)
    state = cluster.ensure_running()
    env = {**ray_process_env(cluster.auth_token()), "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    if cluster.loopback_only:  # else the drivers' Ray rewrites 127.0.0.1 to an address the head does not serve
        env.update(LOOPBACK_ONLY_ENV)
    try:
        yield Head(state.address, env, cluster.auth_token(), state.session_id)
    finally:
        cluster.stop()


def _drive(head: Head, script: str, *args: str, timeout: float = 240) -> tuple[dict[str, Any], str]:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), head.address, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=head.env)
    output = proc.stdout + proc.stderr[-4000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, output
    return json.loads(results[-1][len("RESULT "):]), output


def _key(name: str) -> str:
    return f"cleanup/{name}/{uuid.uuid4().hex}"


def _assert_head_is_free(head: Head) -> None:
    """Each test starts from an empty head; a leak from an earlier one would blame the wrong test."""
    result, output = _drive(head, f"emit(free=both_cpus_free({FREE_WITHIN_S}))")
    assert result["free"], output


def test_killed_worker_releases_its_placement_group(small_head: Head) -> None:
    """SIGKILL of the Ray worker (OOM killer, a test, a crash): the owner removes what the try made."""
    _assert_head_is_free(small_head)
    result, output = _drive(small_head, f"""
        run = RayTaskRun(key={_key("kill")!r}, task_label="cleanup.kill", namespace="cleanup", shards=1,
                         lease_s=120, log=log)
        run.submit(hold_both_cpus, (), {{}}, {{"num_cpus": 0, "max_retries": 0}})
        held = wait_for_holding(run)
        os.kill(int(held["worker_pid"]), signal.SIGKILL)
        status = run.wait()
        started = time.monotonic()
        free = both_cpus_free({FREE_WITHIN_S})
        emit(state=status["state"], pg=pg_state(held["pg"]), free=free, seconds=time.monotonic() - started)
    """)
    assert result["state"] == "failed", output
    assert result["pg"] == "REMOVED", output
    assert result["free"], output
    # The Airflow task log says what was released (RayTaskRun.wait logs the run's lines as "[ray] ...").
    assert "[ray] Released 1 placement group(s) this try made (the try ended failed)" in output


def test_cancelled_try_releases_its_placement_group(small_head: Head) -> None:
    """on_kill / execution_timeout: RayTaskRun.cancel returns with the CPUs already free."""
    _assert_head_is_free(small_head)
    result, output = _drive(small_head, f"""
        run = RayTaskRun(key={_key("cancel")!r}, task_label="cleanup.cancel", namespace="cleanup", shards=1,
                         lease_s=120, log=log)
        run.submit(hold_both_cpus, (), {{}}, {{"num_cpus": 0, "max_retries": 0}})
        held = wait_for_holding(run)
        run.cancel()
        pg_after_cancel = pg_state(held["pg"])
        status = ray.get(run.owner.poll.remote(run.key, 0, 1.0))
        emit(state=status["state"], pg=pg_after_cancel, logs=status["logs"], free=both_cpus_free({FREE_WITHIN_S}))
    """)
    assert result["state"] == "cancelled", output
    assert result["pg"] == "REMOVED", output
    assert result["free"], output
    assert any(line.startswith("Released 1 placement group(s) this try made (the try ended cancelled)")
               for line in result["logs"]), result["logs"]


def test_abandoned_try_is_reaped_with_its_placement_group(small_head: Head) -> None:
    """The Airflow process vanished (SIGKILL): the lease reaps the run, and its placement group goes too."""
    _assert_head_is_free(small_head)
    key = _key("reap")
    abandon = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(f"""
        run = RayTaskRun(key={key!r}, task_label="cleanup.reap", namespace="cleanup", shards=1, lease_s=3, log=log)
        run.submit(hold_both_cpus, (), {{}}, {{"num_cpus": 0, "max_retries": 0}})
        held = wait_for_holding(run)
        print("PG " + held["pg"], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no on_kill, no finally: only the lease notices
    """), small_head.address], capture_output=True, text=True, timeout=240, cwd=ROOT, env=small_head.env)
    assert abandon.returncode == -9, abandon.stdout + abandon.stderr[-4000:]
    pg_hex = next(line.split()[1] for line in abandon.stdout.splitlines() if line.startswith("PG "))
    # Lease 3 s, reaper tick 1 s, then the release: the 2-CPU task gets its CPUs within the bound.
    result, output = _drive(small_head, f"""
        free = both_cpus_free({FREE_WITHIN_S})
        owner = RayTaskRun(key={key!r}, task_label="x", namespace="cleanup", shards=1, lease_s=3, log=log).owner
        emit(free=free, pg=pg_state({pg_hex!r}), inventory=ray.get(owner.inventory.remote()).get({key!r}))
    """)
    assert result["free"], output
    assert result["pg"] == "REMOVED", output
    assert result["inventory"]["state"] == "cancelled", output


def test_failed_try_releases_its_placement_group_and_kills_its_actors(
        small_head: Head) -> None:
    """The callable raised: its worker lives on (Ray reuses it), so the actor it still references is killed."""
    _assert_head_is_free(small_head)
    result, output = _drive(small_head, f"""
        run = RayTaskRun(key={_key("raise")!r}, task_label="cleanup.raise", namespace="cleanup", shards=1,
                         lease_s=120, log=log)
        run.submit(hold_both_cpus, (None, True), {{}}, {{"num_cpus": 0, "max_retries": 0}})
        status = run.wait()
        held = next(dict(p.split("=", 1) for p in line.split()[1:]) for line in ray.get(
            run.owner.poll.remote(run.key, 0, 0.1))["logs"] if line.startswith("holding "))
        emit(state=status["state"], pg=pg_state(held["pg"]), actor=held["actor"],
             free=both_cpus_free({FREE_WITHIN_S}))
    """)
    assert result["state"] == "failed", output
    assert result["pg"] == "REMOVED", output
    assert result["free"], output
    assert "[ray] Killed 1 actor(s) this failed try created: " in output
    assert f"Member {result['actor']}" in output
    assert "[ray] Released 1 placement group(s) this try made (the try ended failed)" in output


def test_ray_retry_after_a_killed_attempt_gets_the_cpus(small_head: Head,
                                                         tmp_path: Path) -> None:
    """ray_max_retries > 0: Ray reruns the task in a new worker, which needs the CPUs the dead attempt held."""
    _assert_head_is_free(small_head)
    marker = tmp_path / "first-attempt"
    result, output = _drive(small_head, f"""
        run = RayTaskRun(key={_key("retry")!r}, task_label="cleanup.retry", namespace="cleanup", shards=1,
                         lease_s=120, log=log)
        run.submit(hold_both_cpus, ({str(marker)!r},), {{}}, {{"num_cpus": 0, "max_retries": 1}})
        held = wait_for_holding(run)
        os.kill(int(held["worker_pid"]), signal.SIGKILL)
        status = run.wait()
        emit(state=status["state"], value=run.fetch() if status["state"] == "finished" else None,
             pg=pg_state(held["pg"]))
    """)
    assert result["state"] == "finished", output
    assert result["value"] == "retry finished", output
    assert result["pg"] == "REMOVED", output
    assert "[ray] Released 1 placement group(s) this try made (Ray retried the task after its worker died)" in output


def test_another_runs_placement_group_is_left_alone(small_head: Head) -> None:
    """Two runs share the owner actor and the keeper's job: killing one releases only its own placement group."""
    _assert_head_is_free(small_head)
    result, output = _drive(small_head, f"""
        def hold_one_cpu(tag):
            import os, time
            import ray
            from ray.util.placement_group import placement_group
            pg = placement_group([{{"CPU": 1}}])
            ray.get(pg.ready(), timeout=60)
            print(f"holding pg={{pg.id.hex()}} worker_pid={{os.getpid()}}", flush=True)
            time.sleep(600)

        runs = [RayTaskRun(key={_key("pair")!r} + str(i), task_label=f"cleanup.pair{{i}}", namespace="cleanup",
                           shards=1, lease_s=120, log=log) for i in range(2)]
        for i, run in enumerate(runs):
            run.submit(hold_one_cpu, (i,), {{}}, {{"num_cpus": 0, "max_retries": 0}})
        held = [wait_for_holding(run) for run in runs]
        os.kill(int(held[1]["worker_pid"]), signal.SIGKILL)
        status = runs[1].wait()
        states = [pg_state(h["pg"]) for h in held]
        runs[0].cancel()
        emit(state=status["state"], states=states, after_cancel=pg_state(held[0]["pg"]))
    """)
    assert result["state"] == "failed", output
    assert result["states"] == ["CREATED", "REMOVED"], output
    assert result["after_cancel"] == "REMOVED", output


def _search_worker(session_id: int) -> int | None:
    """The Ray worker running the Tune example's search on *this* head (others may run one on theirs)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0] == "ray::example_ray_tune_xgboost.search" and os.getsid(proc.pid) == session_id:
                return proc.pid
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return None


@pytest.mark.timeout(TUNE_RETRY_BOUND_S + 600)
def test_tune_search_killed_mid_search_resumes_on_a_two_cpu_head(
        small_head: Head, s3_endpoint: str, airflow_db: Path, ray_connection: Callable[..., Any],
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """The Tune example's search worker is SIGKILLed after some trials finished; the Airflow retry resumes the
    same experiment from its checkpoint on S3 and finishes, on a 2-CPU head.

    Each trial's placement group takes one CPU. The dead try's would hold both CPUs and the retry would
    wait for them forever; a bigger head (the session's has 4 CPUs) leaves the retry 2, which hides the leak.
    The example runs in this process (``dag.test()``) as a user runs it; a thread watches the experiment's
    state on S3 and kills the search's Ray worker.
    """
    from airflow_ray_provider.cluster.checkpoint import safe_component
    from tests.support.dag_runs import why
    from tests.support.examples import example_dag, import_example
    from tests.support.rows import pulled, task_states, tries
    from tests.support.s3server import BUCKET, s3_client

    _assert_head_is_free(small_head)
    ray_connection({"conn_type": "ray", "password": small_head.token, "extra": {
        "address": small_head.address, "namespace": "cleanup-tune", "checkpoint_path": f"s3://{BUCKET}/examples",
        "checkpoint_conn_id": "ckpt_s3"}})
    s3 = s3_client(s3_endpoint)
    killed: list[int] = []
    stop = threading.Event()

    def kill_mid_search() -> None:
        while not stop.is_set():
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="examples/example_ray_tune_xgboost/")
                    .get("Contents", []) if re.search(r"/experiment_state-[^/]+\.json$", o["Key"])]
            if keys:
                state = s3.get_object(Bucket=BUCKET, Key=sorted(keys)[-1])["Body"].read().decode()
                finished = state.count('\\"status\\": \\"TERMINATED\\"')
                pid = _search_worker(small_head.session_id)
                if finished >= 2 and pid:
                    os.kill(pid, signal.SIGKILL)  # trials are running, each holding one CPU in its placement group
                    killed.append(finished)
                    return
            stop.wait(0.5)

    killer = threading.Thread(target=kill_mid_search, name="kill-mid-search", daemon=True)
    killer.start()
    try:
        dr = example_dag("example_ray_tune_xgboost").test(run_conf={"num_samples": 8, "rounds": 16})
    finally:
        stop.set()
        killer.join(30)
    captured = capfd.readouterr()
    output = captured.out + captured.err + caplog.text  # a log line can reach stderr late
    assert killed and killed[0] >= 2, why(output)
    assert set(task_states(dr).values()) == {"success"}, why(output)
    assert tries(dr)["search"] == 2, why(output)  # try 2 resumed; why() shows what failed a try 2 that did not
    assert re.search(r"\[ray\] Released \d+ placement group\(s\) this try made \(the try ended failed\)", output), \
        why(output)
    assert pulled(dr, "search", "trials") == 8
    resumed = re.search(r"Resuming the Tune experiment at (\S+): (\d+) finished trials kept", output)
    assert resumed, output[-8000:]
    run_folder = f"s3://{BUCKET}/examples/example_ray_tune_xgboost/{safe_component(dr.run_id)}"
    assert resumed[1] == f"{run_folder}/search/-1/tune/xgboost-breast-cancer"
    # What the state held when the driver died was kept, not run again.
    assert int(resumed[2]) >= killed[0]
    assert len(pulled(dr, "search", "kept_trials")) == int(resumed[2])
    scored = pulled(dr, "evaluate")
    assert scored["test_accuracy"] > 0.9 and scored["test_rows"] == 114
    assert set(scored["config"]) == {"max_depth", "min_child_weight", "subsample", "eta"}
    line = pulled(dr, "report")
    found = re.search(r"best of (\d+) trials has validation logloss ([0-9.]+)", line)
    assert found and int(found[1]) == 8 and float(found[2]) < 0.4, line
    # The seeded sampler (the seed Param's default, 0) tried exactly the configurations it draws again here,
    # the resumed part of the search included.
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    tune_example, rng = import_example("example_ray_tune_xgboost"), np.random.default_rng(0)
    drawn = [variant["config"] for _ in range(8)
             for _, variant in generate_variants({"config": tune_example.search_space(16)}, random_state=rng)]
    leaderboard = pulled(dr, "search", "leaderboard")
    tried = sorted((row["config"] for row in leaderboard), key=lambda config: config["eta"])
    assert tried == [pytest.approx({k: v for k, v in config.items() if k != "rounds"})
                     for config in sorted(drawn, key=lambda config: config["eta"])]
    assert leaderboard[0]["logloss"] == pytest.approx(float(found[2]), abs=1e-4)
