"""Fan-out and chains under the real scheduler: ``@task`` against ``@task.ray``, LocalExecutor, SQLite.

    python benchmarks/fanout.py [--n 100,1000] [--rounds 2] [--parallelism 8] [--no-chain] [--via gateway]

Per N, one Airflow deployment (scheduler, dag-processor, api-server; ``scripts/local_topology.Airflow``)
with ``AIRFLOW_RAY_BENCH_FANOUT_N=N`` runs ``fanout_plain`` and ``fanout_ray``
(``benchmarks/dags/fanout_dags.py``: ``start -> work.expand() over N -> total``), alternating, ``--rounds``
times each; the first deployment also runs ``chain10_plain`` / ``chain10_ray``. Wall time is the DAG
run's ``end_date - start_date`` from the REST API; the per-task figure is the median duration of the mapped
instances (what one task process spends between its start and end as Airflow records them). Every run
must end ``success`` and ``total`` must return the right sum, or the benchmark fails.

``--via gateway``: the ``@task.ray`` tasks reach the head through its gateway (issue 24): the connection has
``gateway_url`` and ``dashboard_url`` only, the first task starts the gateway through Ray's Jobs API (inside the
first ray run's wall time), and no task process is a Ray driver.

Writes ``benchmarks/results/fanout.json``, ``fanout.md`` and ``fanout.png`` (wall time and ratio against N), or
``fanout-gateway.*`` with ``--via gateway``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.benchutil import ROOT, cpu_model, provider_commit, publish

from scripts.local_topology import Airflow

RESULTS = ROOT / "benchmarks" / "results"
DAG_FILES = ("fanout_dags.py", "_chain.py", "chain_plain.py", "chain_ray.py")


def _parse_ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _task_instances(airflow: Airflow, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = airflow.api.ok("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
                                     f"?limit=100&offset={len(out)}")
        out += page["task_instances"]
        if len(out) >= page["total_entries"] or not page["task_instances"]:
            return out


def _ray_processes() -> list[Any]:
    """The Ray head's processes (GCS, raylet, dashboard agents, workers, owner actors): all long-lived here."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        text = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
        if any(mark in text for mark in ("gcs_server", "raylet", "ray::", "default_worker.py", "ray/dashboard",
                                         "runtime_env/agent", "log_monitor.py", "cluster.gateway")):
            found.append(proc)
    return found


def _cpu_of(procs: list[Any]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except Exception:  # noqa: BLE001 - it exited
            pass
    return total


def _busy() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def _run(airflow: Airflow, dag_id: str, expected: int, timeout: float) -> dict[str, float]:
    ray_procs = _ray_processes()
    ray0, busy0 = _cpu_of(ray_procs), _busy()
    run_id = airflow.api.trigger(dag_id)
    state = airflow.wait(dag_id, lambda: airflow.api.run_state(dag_id, run_id), timeout, 1.0)
    # Workers started during the run are counted from their start; the ones that existed from before, by delta.
    new = [p for p in _ray_processes() if p.pid not in {q.pid for q in ray_procs}]
    ray_cpu = _cpu_of(ray_procs) - ray0 + _cpu_of(new)
    busy = _busy() - busy0
    if state != "success":
        raise RuntimeError(f"{dag_id} ended {state}\n{airflow.diagnostics()[-20000:]}")
    run = airflow.api.ok("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
    tis = _task_instances(airflow, dag_id, run_id)
    last = max(tis, key=lambda ti: ti["end_date"] or "")
    value = airflow.api.ok("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{last['task_id']}"
                                  f"/xcomEntries/return_value?deserialize=true")["value"]
    if int(value) != expected:
        raise RuntimeError(f"{dag_id}: {last['task_id']} returned {value!r}, expected {expected}")
    mapped = [ti for ti in tis if ti["map_index"] >= 0] or tis
    durations = [ti["duration"] for ti in mapped if ti["duration"] is not None]
    return {"wall_s": round(_parse_ts(run["end_date"]) - _parse_ts(run["start_date"]), 2),
            "task_median_s": round(statistics.median(durations), 3), "tasks": len(tis),
            "machine_cpu_s": round(busy, 1), "ray_cpu_s": round(ray_cpu, 1)}


def deployment(work: Path, n: int, parallelism: int, chain: bool, rounds: int, conn: str,
               secret: str) -> dict[str, Any]:
    dags = work / f"n{n}" / "dags"
    dags.mkdir(parents=True)
    for name in DAG_FILES:
        shutil.copy(ROOT / "benchmarks" / "dags" / name, dags / name)
    airflow = Airflow(home=work / f"n{n}" / "home", dags=dags, db_url=f"sqlite:///{work / f'n{n}' / 'airflow.db'}",
                      extra_env={"AIRFLOW_RAY_BENCH_FANOUT_N": str(n), "AIRFLOW_CONN_RAY_DEFAULT": conn,
                                 "AIRFLOW__RAY__SECRET_KEY": secret,
                                 "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                                 "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(max(n, 16))})
    airflow.migrate()
    timeout = 120 + 3.0 * n
    result: dict[str, Any] = {"n": n, "runs": {}}
    try:
        airflow.start()
        for dag_id in ("fanout_plain", "fanout_ray", "chain10_plain", "chain10_ray"):
            airflow.wait(f"{dag_id} parsed", lambda d=dag_id: airflow.api.has_dag(d), 300)
        expected = n * (n + 1) // 2  # sum(x + 1 for x in range(n))
        for _ in range(rounds):
            for kind in ("plain", "ray"):
                row = _run(airflow, f"fanout_{kind}", expected, timeout)
                result["runs"].setdefault(f"fanout_{kind}", []).append(row)
                print(f"N={n} {kind}: {row}", flush=True)
            if chain:
                for kind in ("plain", "ray"):
                    row = _run(airflow, f"chain10_{kind}", 10, 600)
                    result["runs"].setdefault(f"chain10_{kind}", []).append(row)
                    print(f"chain10 {kind}: {row}", flush=True)
    finally:
        airflow.stop()
    return result


def _best(rows: list[dict[str, float]], field: str = "wall_s") -> float:
    return min(r[field] for r in rows)


def report(results: list[dict[str, Any]], args: argparse.Namespace, meta: dict[str, str]) -> str:
    via = ("through the head's gateway (no task process is a Ray driver; the first ray run starts the gateway "
           "through Ray's Jobs API)" if args.via == "gateway" else "each task process a Ray driver")
    lines = [f"# fanout: `@task` vs `@task.ray` under the real scheduler ({meta['date']}, {meta['cpu']}, "
             f"provider {meta['commit']})", "",
             f"`python benchmarks/fanout.py --n {args.n} --rounds {args.rounds} --parallelism {args.parallelism}"
             f"{'' if args.chain else ' --no-chain'}{' --via gateway' if args.via == 'gateway' else ''}`; "
             f"LocalExecutor, parallelism {args.parallelism}, SQLite, one Ray head (2 CPUs); `@task.ray` {via}. "
             f"Best of {args.rounds} run(s) each, alternating.", "",
             "| DAG | N | plain wall (s) | ray wall (s) | ratio ray/plain (goal ≤ 1.2) | plain task median (s) "
             "| ray task median (s) | machine CPU plain / ray (s) | of which Ray's processes, ray run (s) "
             "| all walls plain / ray (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for family in ("fanout", "chain10"):
            plain, ray = res["runs"].get(f"{family}_plain"), res["runs"].get(f"{family}_ray")
            if not plain or not ray:
                continue
            ratio = _best(ray) / _best(plain)
            lines.append(f"| {family} | {res['n'] if family == 'fanout' else 10} | {_best(plain):.1f} | "
                         f"{_best(ray):.1f} | **{ratio:.2f}** {'met' if ratio <= 1.2 else 'NOT met'} | "
                         f"{_best(plain, 'task_median_s'):.2f} | {_best(ray, 'task_median_s'):.2f} | "
                         f"{_best(plain, 'machine_cpu_s'):.0f} / {_best(ray, 'machine_cpu_s'):.0f} | "
                         f"{_best(ray, 'ray_cpu_s'):.0f} | "
                         f"{', '.join(str(r['wall_s']) for r in plain)} / {', '.join(str(r['wall_s']) for r in ray)} |")
    lines += ["", "Machine CPU: all cores' busy time during the run (`/proc/stat`); Ray's processes: GCS, raylet, "
              "agents, workers and owner actors. The rest of the ray run's CPU is Airflow's: the scheduler, "
              "API server and the task processes."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in results]
    plain = [_best(r["runs"]["fanout_plain"]) for r in results]
    ray = [_best(r["runs"]["fanout_ray"]) for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ns, plain, "o-", label="@task")
    left.plot(ns, ray, "s-", label="@task.ray")
    left.set(xlabel="mapped instances N", ylabel="DAG run wall time (s)", xscale="log", yscale="log",
             title="1 -> expand(N) -> 1, LocalExecutor")
    left.legend()
    right.plot(ns, [r / p for r, p in zip(ray, plain, strict=True)], "o-")
    right.axhline(1.2, color="grey", linestyle="--", label="goal 1.2")
    right.set(xlabel="mapped instances N", ylabel="wall ratio @task.ray / @task", xscale="log",
              title="cost of @task.ray")
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="100,1000", help="comma-separated N (default 100,1000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parallelism", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (task logs, DBs)")
    parser.add_argument("--no-chain", dest="chain", action="store_false", help="skip chain10 under the scheduler")
    parser.add_argument("--via", choices=("driver", "gateway"), default="driver",
                        help="how @task.ray reaches the head (default: each task process is a Ray driver)")
    args = parser.parse_args()
    from airflow_ray_provider.local_cluster import LocalRayCluster, free_ports

    (ROOT / "benchmarks" / ".work").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fanout-", dir=ROOT / "benchmarks" / ".work"))
    gateway = args.via == "gateway"
    if gateway:  # the gateway job's entrypoint runs `python` from the head's PATH: this environment's
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    cluster = LocalRayCluster(work / "ray", num_cpus=2, include_dashboard=gateway)
    state = cluster.ensure_running()
    extra: dict[str, Any] = {"address": state.address, "namespace": "bench"}
    if gateway:
        extra = {"gateway_url": f"http://127.0.0.1:{free_ports(1)[0]}", "dashboard_url": state.dashboard_url,
                 "namespace": "bench"}
    conn = json.dumps({"conn_type": "ray", "password": cluster.auth_token(), "extra": extra})
    secret = secrets.token_hex(32)  # [ray] secret_key of every Airflow process: the gateway's key derives from it
    meta = {"commit": provider_commit(), "cpu": cpu_model(), "date": dt.date.today().isoformat()}
    results = []
    try:
        for i, n in enumerate(int(x) for x in args.n.split(",")):
            results.append(deployment(work, n, args.parallelism, args.chain and i == 0, args.rounds, conn, secret))
    finally:
        cluster.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    stem = "fanout-gateway" if gateway else "fanout"
    (RESULTS / f"{stem}.json").write_text(json.dumps({**meta, "args": vars(args), "results": results}, indent=2)
                                          + "\n")
    publish(report(results, args, meta), RESULTS / f"{stem}.md")
    plot(results, RESULTS / f"{stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
