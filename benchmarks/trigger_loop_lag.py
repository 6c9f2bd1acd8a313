"""trigger_loop_lag: how much do 100 RayRunTriggers delay the triggerer's event loop?

    python benchmarks/trigger_loop_lag.py [--runs 100] [--seconds 30] [--poll-interval 2]

Starts an embedded Ray head under a temp home (``benchmarks/.work``), and a submitter process (the
stand-in for the task processes that deferred) that submits ``--runs`` Ray runs through the
provider's ``RayTaskRun``, each sleeping ``--seconds`` with ``num_cpus=0`` so they all run at once,
with a 60 s lease that only the triggers renew. Then this process, which never joins Ray (as the
triggerer does not), watches them with one ``RayRunTrigger`` each in one asyncio loop (so one
watcher subprocess for the one connection) while a side task measures event-loop lag the whole
time: the overshoot of ``asyncio.sleep(0.01)``, and the loop thread's CPU time in each interval (the
wall-clock lag also counts time the OS did not run this process: the runs' Ray workers start on the
same cores; the CPU time is what the loop itself spent running code). Writes p50/p99/max of both, the
outcome of every run and how long the events took to ``benchmarks/results/trigger_loop_lag.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# Submits the runs, prints their keys and shards on one "RUNS <json>" line, then stays alive (it owns each
# run's payload object) until its stdin closes.
SUBMITTER = """
import json, logging, sys, time, uuid
from airflow_ray_provider.hooks.ray import RayHook
from airflow_ray_provider.submission import RayTaskRun
RayHook().get_conn()
n, seconds, lease_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
def nap(s):
    import time
    time.sleep(s)
    return "slept"
runs = []
for i in range(n):
    key = f"bench/trigger-lag/{uuid.uuid4().hex}"
    run = RayTaskRun(key=key, task_label=f"bench.{i}", namespace="bench", shards=4, lease_s=lease_s,
                     log=logging.getLogger("submitter"))
    run.submit(nap, (seconds,), {}, {"num_cpus": 0})
    runs.append(run)
print("RUNS " + json.dumps([[r.key, r.shard, r.task_label] for r in runs]), flush=True)
sys.stdin.read()
for r in runs:
    r.release()
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def watch(runs: list[list[Any]], poll_interval: float) -> dict[str, Any]:
    from airflow_ray_provider.triggers import RayRunTrigger, sign_run, watcher

    # (seconds since start, lag, CPU time of this thread during the interval). Wall-clock lag also counts
    # time the OS did not run this process at all (100 Ray workers start on the same 2 cores); the
    # thread's CPU time is the part the loop spent running code: what a blocking trigger would add.
    lags: list[tuple[float, float, float]] = []
    stop = asyncio.Event()
    ready_at: list[float] = []  # when the watcher first answered: start-up vs steady state

    async def monitor() -> None:
        client = watcher.get_client("ray_default")
        while not stop.is_set():
            before, cpu_before = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            lags.append((time.monotonic() - started, now - before - 0.01, time.thread_time() - cpu_before))
            if not ready_at and client.alive:
                ready_at.append(time.monotonic() - started)

    started = time.monotonic()
    done_at: list[float] = []

    async def one(key: str, shard: int, label: str) -> dict[str, Any]:
        trigger = RayRunTrigger(ray_conn_id="ray_default", namespace="bench", shard=shard, key=key, task_label=label,
                                poll_interval=poll_interval, signature=sign_run("ray_default", "bench", shard, key))
        async for event in trigger.run():
            done_at.append(time.monotonic() - started)
            return event.payload
        raise RuntimeError("the trigger ended without an event")

    lag_task = asyncio.create_task(monitor())
    try:
        events = await asyncio.gather(*(one(*run) for run in runs))
    finally:
        stop.set()
        await lag_task
        client = watcher.get_client("ray_default")
        restarts = client.restarts
        await watcher.close_all()
    return {"lags": lags, "events": events, "done_at": done_at, "restarts": restarts,
            "ready_at": ready_at[0] if ready_at else float("nan"),
            "watch_s": time.monotonic() - started}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--seconds", type=float, default=30.0, help="how long each Ray run sleeps")
    p.add_argument("--poll-interval", type=float, default=2.0)
    # Covers submitting all runs plus the watcher's start on a loaded 2-core machine (about 50 s each
    # here), before the triggers' first polls renew it; a 60 s lease got half the runs reaped.
    p.add_argument("--lease", type=float, default=300.0, help="the runs' lease in the owner actor")
    p.add_argument("--out", type=Path, default=HERE / "results" / "trigger_loop_lag.json")
    args = p.parse_args()

    (HERE / ".work").mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="trigger-lag-", dir=HERE / ".work"))
    os.environ.update(AIRFLOW_HOME=str(home), RAY_USAGE_STATS_ENABLED="0", AIRFLOW__CORE__LOAD_EXAMPLES="False",
                      AIRFLOW__RAY__XCOM_GC_INTERVAL="-1")
    from airflow_ray_provider.local_cluster import LocalRayCluster

    cluster = LocalRayCluster(home / "ray", num_cpus=2)
    submitter = None
    state = None
    try:
        state = cluster.ensure_running()
        os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps({
            "conn_type": "ray", "password": cluster.auth_token(),
            "extra": {"address": state.address, "namespace": "bench"}})
        t0 = time.monotonic()
        submitter = subprocess.Popen([sys.executable, "-c", SUBMITTER, str(args.runs), str(args.seconds),
                                      str(args.lease)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        assert submitter.stdout is not None
        for line in submitter.stdout:  # Airflow's and Ray's log lines may come first
            if line.startswith("RUNS "):
                break
            print(f"submitter: {line.rstrip()}")
        else:
            raise RuntimeError(f"the submitter exited with {submitter.wait()}")
        runs = json.loads(line[len("RUNS "):])
        submit_s = time.monotonic() - t0
        print(f"submitted {len(runs)} runs in {submit_s:.1f}s; watching them with {len(runs)} triggers")
        result = asyncio.run(watch(runs, args.poll_interval))
    finally:
        if submitter is not None and submitter.poll() is None:
            assert submitter.stdin is not None
            submitter.stdin.close()
            try:
                submitter.wait(60)
            except subprocess.TimeoutExpired:
                submitter.kill()
        cluster.stop()
        if state is not None:
            shutil.rmtree(state.temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)

    from benchutil import cpu_model

    def summary(samples: list[tuple[float, float, float]], column: int = 1) -> dict[str, Any]:
        ms = [sample[column] * 1000 for sample in samples]
        if not ms:
            return {"samples": 0}
        return {"samples": len(ms), "p50": round(statistics.median(ms), 3), "p99": round(percentile(ms, 0.99), 3),
                "max": round(max(ms), 3)}

    ready = result["ready_at"]

    report = {
        "command": " ".join(["python", "benchmarks/trigger_loop_lag.py", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "runs": args.runs, "run_seconds": args.seconds, "poll_interval_s": args.poll_interval,
        "submit_s": round(submit_s, 2),
        "lease_s": args.lease,
        "loop_lag_ms": summary(result["lags"]),
        "watcher_ready_s": round(ready, 2),
        "loop_lag_ms_until_watcher_ready": summary([x for x in result["lags"] if x[0] < ready]),
        "loop_lag_ms_after_watcher_ready": summary([x for x in result["lags"] if x[0] >= ready]),
        "loop_cpu_ms_per_10ms_sleep": summary(result["lags"], column=2),
        "worst_lags": [{"at_s": round(t, 2), "ms": round(lag * 1000, 1), "loop_cpu_ms": round(cpu * 1000, 1)}
                       for t, lag, cpu in sorted(result["lags"], key=lambda x: -x[1])[:5]],
        "events": dict(Counter(f"{e['status']}/{e.get('state')}" for e in result["events"])),
        "first_event_s": round(min(result["done_at"]), 2), "last_event_s": round(max(result["done_at"]), 2),
        "watch_s": round(result["watch_s"], 2), "watcher_restarts": result["restarts"],
        "note": ("lag = overshoot of asyncio.sleep(0.01) in the loop running all triggers, from the first "
                 "trigger's start (including the watcher subprocess start) to the last event; the Ray workers of "
                 "the 100 runs start meanwhile on the same 2 cores (see load_avg_at_end), which the lag includes"),
    }
    text = json.dumps(report, indent=2) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 0 if report["events"] == {"done/finished": args.runs} else 1


if __name__ == "__main__":
    sys.exit(main())
