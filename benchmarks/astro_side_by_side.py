"""This provider against astro-provider-ray 0.4.0 on the same embedded head: a 10-task chain, per-task wall time,
and whether each task's value reaches the next.

    python benchmarks/astro_side_by_side.py [--rounds 3]

astro-provider-ray (Astronomer's provider, deprecated in 2026) and this one both claim the connection type
``ray``, so astro runs from its own virtualenv (``benchmarks/.work/astro-venv``, made with uv on first use:
``astro-provider-ray==0.4.0``, ``apache-airflow==3.3.2``, ``ray[default]==2.60.0`` under constraints.txt), with its
own ``AIRFLOW_HOME``. One embedded Ray head with its dashboard (astro submits every task as a Ray job through the
dashboard's job API) serves both. Each round runs ``airflow dags test chain10_ray`` (``benchmarks/dags/chain_ray.py``)
and ``airflow dags test chain10_astro`` (``benchmarks/dags_astro/chain10_astro.py``: the same chain with astro's
``@ray.task``, 1 s polling), alternating. Per-task wall time is the median task-instance duration from each
home's SQLite DB; "values reach the next task" is t10's XCom being 10 (ours) or t10's Ray job printing
``VALUE 10`` (astro, whose XCom is the job id).

Writes ``benchmarks/results/astro_side_by_side.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.benchutil import ROOT, cpu_model, provider_commit, publish, sh

HERE = ROOT / "benchmarks"
ASTRO_VENV = HERE / ".work" / "astro-venv"
ASTRO_PINS = ("astro-provider-ray==0.4.0", "apache-airflow==3.3.2", "ray[default]==2.60.0")


def astro_venv() -> Path:
    python = ASTRO_VENV / "bin" / "python"
    if not (ASTRO_VENV / ".installed").exists():
        uv = Path(sys.executable).parent / "uv"
        subprocess.run([str(uv), "venv", "-q", "-p", sys.executable, str(ASTRO_VENV)], check=True)
        subprocess.run([str(uv), "pip", "install", "-q", "--python", str(python), *ASTRO_PINS, "-c",
                        str(ROOT / "constraints.txt")], check=True, timeout=1800)
        (ASTRO_VENV / ".installed").touch()
    return python


def _home(work: Path, name: str, dags: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VIRTUAL_ENV"))}
    env.update(AIRFLOW_HOME=str(work / name), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", RAY_USAGE_STATS_ENABLED="0",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{work / name / 'airflow.db'}", **extra)
    return env


def _durations(db: Path, dag_id: str) -> tuple[list[float], str]:
    with sqlite3.connect(db) as conn:
        (run_id,) = conn.execute("SELECT run_id FROM dag_run WHERE dag_id=? ORDER BY id DESC LIMIT 1",
                                 (dag_id,)).fetchone()
        rows = conn.execute("SELECT task_id, state, start_date, end_date FROM task_instance WHERE dag_id=? AND "
                            "run_id=?", (dag_id, run_id)).fetchall()
    bad = [f"{t} {s}" for t, s, _, _ in rows if s != "success"]
    if bad or len(rows) != 10:
        raise RuntimeError(f"{dag_id}: not 10 successful tasks: {rows}")

    def ts(text: str) -> float:
        return dt.datetime.fromisoformat(text).timestamp()

    return [ts(end) - ts(start) for _, _, start, end in rows], run_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from airflow_ray_provider.local_cluster import LocalRayCluster

    astro_python = astro_venv()
    (HERE / ".work").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="astro-", dir=HERE / ".work"))
    ours_dags = work / "dags-ours"
    ours_dags.mkdir()
    for name in ("_chain.py", "chain_ray.py"):
        shutil.copy(HERE / "dags" / name, ours_dags / name)
    cluster = LocalRayCluster(work / "ray", num_cpus=2, include_dashboard=True)
    state = cluster.ensure_running()
    token = cluster.auth_token() or ""
    if not state.dashboard_url:
        raise RuntimeError("the embedded head started without its dashboard; astro needs its job API")
    dashboard = state.dashboard_url if "://" in state.dashboard_url else f"http://{state.dashboard_url}"
    ours = _home(work, "home-ours", ours_dags, {"AIRFLOW_CONN_RAY_DEFAULT": json.dumps(
        {"conn_type": "ray", "password": token, "extra": {"address": state.address, "namespace": "bench"}})})
    astro = _home(work, "home-astro", HERE / "dags_astro", {
        "AIRFLOW_CONN_RAY_ASTRO": json.dumps({"conn_type": "ray", "extra": {
            "address": dashboard, "headers": json.dumps({"Authorization": f"Bearer {token}"})}}),
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    results: dict[str, dict[str, list]] = {"ours": {"wall": [], "task": [], "value_ok": []},
                                           "astro": {"wall": [], "task": [], "value_ok": []}}
    try:
        for name, python, env in (("ours", Path(sys.executable), ours), ("astro", astro_python, astro)):
            rc, out = sh([str(python), "-m", "airflow", "db", "migrate"], env, 900)
            if rc != 0:
                raise RuntimeError(f"airflow db migrate ({name}) failed:\n{out[-3000:]}")
        for i in range(args.rounds + 1):
            for name, python, env, dag_id in (("ours", Path(sys.executable), ours, "chain10_ray"),
                                              ("astro", astro_python, astro, "chain10_astro")):
                t0 = time.perf_counter()
                rc, out = sh([str(python), "-m", "airflow", "dags", "test", dag_id], env, 1800)
                wall = time.perf_counter() - t0
                if rc != 0:
                    errors = [line for line in out.splitlines() if "error" in line.lower() and "Warning" not in line]
                    raise RuntimeError(f"{dag_id} failed (exit code {rc}):\n" + "\n".join(errors[:40])[:8000])
                durations, run_id = _durations(Path(env["AIRFLOW_HOME"]) / "airflow.db", dag_id)
                if name == "ours":
                    with sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db") as conn:
                        (value,) = conn.execute("SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id='t10' "
                                                "AND key='return_value'", (dag_id, run_id)).fetchone()
                    value_ok = (json.loads(value) if isinstance(value, (str, bytes)) else value) == 10
                else:
                    value_ok = "VALUE 10" in out
                print(f"round {i} {name}: wall {wall:.1f}s, task median {statistics.median(durations):.2f}s, "
                      f"t10 got 10: {value_ok}", flush=True)
                if i:  # round 0 warms up (first owner actor, first job, first imports)
                    results[name]["wall"].append(wall)
                    results[name]["task"].append(statistics.median(durations))
                    results[name]["value_ok"].append(value_ok)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {n: {k: statistics.median(v) for k, v in r.items() if k != "value_ok"} for n, r in results.items()}
    lines = [f"# astro_side_by_side ({dt.date.today()}, {cpu_model()}, provider {provider_commit()})", "",
             f"`python benchmarks/astro_side_by_side.py --rounds {args.rounds}`: `airflow dags test` of a 10-task "
             "chain, this provider (`@task.ray`) against astro-provider-ray 0.4.0 (`@ray.task`, poll_interval 1 s) "
             "in its own virtualenv, one embedded head (2 CPUs, dashboard on), alternating, after one warm-up "
             "round. Medians.", "",
             "| provider | `dags test` wall (s) | per-task duration (s) | t10 received 10 (values reach the next "
             "task) |",
             "|---|---|---|---|"]
    for name, label in (("ours", "airflow-ray-provider"), ("astro", "astro-provider-ray 0.4.0")):
        ok = results[name]["value_ok"]
        lines.append(f"| {label} | {med[name]['wall']:.1f} | {med[name]['task']:.2f} | "
                     f"{'yes' if all(ok) else 'no'} ({sum(ok)}/{len(ok)} runs) |")
    lines += ["", f"Per-task ratio astro / this provider: **{med['astro']['task'] / med['ours']['task']:.1f}x**; "
              f"whole `dags test`: {med['astro']['wall'] / med['ours']['wall']:.1f}x."]
    publish("\n".join(lines) + "\n", HERE / "results" / "astro_side_by_side.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
