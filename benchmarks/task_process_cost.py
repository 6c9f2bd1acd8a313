"""What one ``@task.ray`` task process pays on its own: import, connect, owner lookup, first serialization.

    python benchmarks/task_process_cost.py [--rounds 5]

Starts an embedded Ray head and a SQLite ``AIRFLOW_HOME``, then runs ``benchmarks/profile_ray_task.py
chain1_ray`` (``airflow dags test`` of a one-task DAG, with timers around the provider's calls) in
``--rounds`` fresh processes after one warm-up that creates the owner actor. Every call is then a task
process's first: the table is the per-process cost a real executor pays for each task instance. ``import
ray`` is timed cold at the start of each process; under the scheduler with ``[ray] preload_modules`` a
LocalExecutor task process inherits it (and pyarrow, which Ray's first serialization imports).

Writes ``benchmarks/results/task_process_cost.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.benchutil import ROOT, cpu_model, provider_commit, publish, sh

HERE = ROOT / "benchmarks"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from airflow_ray_provider.local_cluster import LocalRayCluster

    (HERE / ".work").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="task-process-", dir=HERE / ".work"))
    dags = work / "dags"
    dags.mkdir()
    for name in ("_chain.py", "chain_ray.py"):
        shutil.copy(HERE / "dags" / name, dags / name)
    cluster = LocalRayCluster(work / "ray", num_cpus=2)
    state = cluster.ensure_running()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(work / "home"), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", RAY_USAGE_STATS_ENABLED="0",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{work / 'airflow.db'}",
               AIRFLOW_CONN_RAY_DEFAULT=json.dumps({"conn_type": "ray", "password": cluster.auth_token(),
                                                    "extra": {"address": state.address, "namespace": "bench"}}))
    profiles: dict[str, list[dict]] = {"cold": [], "preloaded": []}
    try:
        rc, out = sh([sys.executable, "-m", "airflow", "db", "migrate"], env, 600)
        if rc != 0:
            raise RuntimeError(f"airflow db migrate failed: {out[-2000:]}")
        for i in range(args.rounds + 1):
            for variant in ("cold", "preloaded") if i % 2 else ("preloaded", "cold"):
                time.sleep(3)  # let the head finish with the previous driver's exit (its job ends)
                rc, out = sh([sys.executable, str(HERE / "profile_ray_task.py"), "chain1_ray"],
                             {**env, "PROFILE_PRELOADED": str(int(variant == "preloaded"))}, 600)
                lines = [x for x in out.splitlines() if x.startswith("PROFILE_JSON ")]
                if rc != 0 or not lines:
                    raise RuntimeError(f"profiled run {i} failed (exit code {rc}):\n{out[-3000:]}")
                if i:  # the first run creates the owner actor: not a per-process cost
                    profiles[variant].append(json.loads(lines[-1].split(" ", 1)[1]))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"# task_process_cost: one `@task.ray` task process's own costs ({dt.date.today()}, {cpu_model()}, "
             f"provider {provider_commit()})", "",
             f"`python benchmarks/task_process_cost.py --rounds {args.rounds}`: {args.rounds} pairs of fresh processes "
             "(`airflow dags test chain1_ray` with the timers of `profile_ray_task.py`, 3 s apart, the order of the "
             "pair swapped every round), *cold* (the "
             "process imports everything itself) and *preloaded* (Ray, the operator and pyarrow imported first, as a "
             "LocalExecutor task process inherits them from a scheduler with `[ray] preload_modules`); owner actor "
             "already running, embedded head on loopback. Medians of each process's first (only) call; indented "
             "rows are inside the row above.", "",
             "| call | cold median (ms) | cold min-max | preloaded median (ms) | preloaded min-max |",
             "|---|---|---|---|---|"]

    def cells(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.1f} | {min(values) * 1000:.0f}-{max(values) * 1000:.0f}"

    lines.append("| imports before Airflow (`import ray`, and for preloaded the rest of the preload) | "
                 + " | ".join(cells([p["preload_s"] for p in profiles[v]]) for v in ("cold", "preloaded")) + " |")
    names = [row["call"] for row in profiles["cold"][0]["rows"]]
    for name in names:
        per = {v: [r["first_s"] for p in profiles[v] for r in p["rows"] if r["call"] == name] for v in profiles}
        lines.append(f"| {name} | " + " | ".join(cells(per[v]) if per[v] else "- | -" for v in ("cold", "preloaded"))
                     + " |")
    publish("\n".join(lines) + "\n", HERE / "results" / "task_process_cost.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
