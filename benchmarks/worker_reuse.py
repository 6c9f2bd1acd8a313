"""worker_reuse: do consecutive ``@task.ray`` tasks from new processes reuse a warm Ray worker?

A minimal reproduction without Airflow, for the per-task cost found by ``chain10.py``. It starts
an embedded head under a temp home, lets one short-lived driver create the owner actor (as the
first Airflow task process does) and exit, then runs ``--tasks`` trivial tasks through the
provider's ``RayTaskRun`` from ``--drivers`` more processes, ``--gap`` seconds apart, and prints how
many distinct Ray worker processes ran them and how long each wait took.

    python benchmarks/worker_reuse.py [--gap 0.5] [--tasks 6] [--drivers 2] [--keeper]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Both connect with ray.init themselves: the head's token comes in the environment (ray_process_env), and
# keep_loopback_addresses() keeps Ray from dialling the machine's address, where the loopback-only head is not.
DRIVER = """
import logging, sys, time
from airflow_ray_provider.local_cluster import keep_loopback_addresses
keep_loopback_addresses()
import ray
from airflow_ray_provider.submission import RayTaskRun
address, gap, tasks = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
ray.init(address=address, namespace="airflow", log_to_driver=False, configure_logging=False)
log = logging.getLogger("worker_reuse")
pids, waits = [], []
for i in range(tasks):
    run = RayTaskRun(key=f"worker_reuse/{time.time()}/{i}", task_label=f"t{i}", namespace="airflow",
                     shards=1, lease_s=60, log=log)
    run.submit(lambda x: x + 1, (i,), {}, {"name": f"t{i}"})
    started = time.perf_counter()
    run.wait()
    waits.append(time.perf_counter() - started)
    assert run.fetch() == i + 1
    run.release()
    pids.append(run.events.get("pid"))
    time.sleep(gap)
print(" ".join(str(p) for p in pids), "|", " ".join(f"{w:.2f}" for w in waits), flush=True)
"""
KEEPER = """
import sys, time
from airflow_ray_provider.local_cluster import keep_loopback_addresses
keep_loopback_addresses()
import ray
from airflow_ray_provider.cluster.owner import get_owner
ray.init(address=sys.argv[1], namespace="airflow", log_to_driver=False, configure_logging=False)
ray.get(get_owner("airflow", 0).ping.remote())
print("ready", flush=True)
time.sleep(86400)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gap", type=float, default=0.5, help="seconds between tasks (default 0.5)")
    p.add_argument("--tasks", type=int, default=6, help="tasks per driver (default 6)")
    p.add_argument("--drivers", type=int, default=2, help="driver processes after the first (default 2)")
    p.add_argument("--keeper", action="store_true", help="also keep a long-lived driver (the original experiment)")
    args = p.parse_args()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from airflow_ray_provider.local_cluster import LocalRayCluster, ray_process_env

    (HERE / ".work").mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="worker-reuse-", dir=HERE / ".work"))
    cluster = LocalRayCluster(home / "ray")
    keeper = None
    state = None
    try:
        state = cluster.ensure_running()
        print(f"head at {state.address}")
        env = ray_process_env(cluster.auth_token())  # the head requires its token (token auth is the default)
        if args.keeper:
            keeper = subprocess.Popen([sys.executable, "-c", KEEPER, state.address], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, start_new_session=True, env=env)
            if keeper.stdout is None or keeper.stdout.readline().strip() != "ready":
                raise RuntimeError("keeper did not start")
        else:  # what happens without one: the first task process creates the owner actor, then exits
            subprocess.run([sys.executable, "-c", DRIVER, state.address, "0", "1"], check=True, timeout=300,
                           capture_output=True, env=env)
        all_pids: set[str] = set()
        for d in range(args.drivers):
            out = subprocess.run([sys.executable, "-c", DRIVER, state.address, str(args.gap), str(args.tasks)],
                                 check=True, timeout=600, capture_output=True, text=True, env=env).stdout.strip()
            pids, waits = out.splitlines()[-1].split(" | ")
            all_pids.update(pids.split())
            print(f"driver {d + 1}: worker pids {pids}; waits (s) {waits}")
        total = args.drivers * args.tasks
        print(f"{len(all_pids)} Ray worker process(es) for {total} tasks "
              f"({'extra long-lived driver on' if args.keeper else 'first driver exited; owners via the provider'})")
    finally:
        if keeper is not None:
            keeper.terminate()
            keeper.wait(30)
        cluster.stop()
        if state is not None:
            shutil.rmtree(state.temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
