"""chain10: wall time of ``airflow dags test`` for a 10-task chain, plain ``@task`` vs ``@task.ray``.

Every run is the real CLI in a subprocess, against one isolated AIRFLOW_HOME (SQLite) and the
embedded Ray head, which is started before timing and stopped at the end. Runs are interleaved
(plain, ray, plain, ray, ...); each is checked (exit code, DagRun state, XCom of the last task).
Also times 1- and 20-task chains to split one-time from per-task cost, and does one profiled
Ray run (``profile_ray_task.py``) that times the provider's calls.

    python benchmarks/chain10.py [--rounds 5] [--scaling-rounds 2] [--owner-keeper]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from benchutil import cpu_model, med, provider_commit, publish, sh

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TASK_LINE = re.compile(r"^(\S+Z) .*\[DAG TEST\] (starting|end task) task_id=(t\d+)")
RAY_DONE = re.compile(r"Ray task \S+ finished after ([0-9.]+)s")
WORKER_PID = re.compile(r"Running on Ray node .* worker pid (\d+)")
RUN_DONE = re.compile(r"DagRun Finished: dag_id=(\S+), .*run_id=([^,]+), .*state=(\w+)")
# A direct ray.init on the embedded head: the token comes in RAY_AUTH_MODE/RAY_AUTH_TOKEN (see keeper_env), and
# keep_loopback_addresses() keeps Ray from dialling the machine's address, where the loopback-only head is not.
KEEPER = """
import sys, time
from airflow_ray_provider.local_cluster import keep_loopback_addresses
keep_loopback_addresses()
import ray
from airflow_ray_provider.cluster.owner import get_owner
ray.init(address=sys.argv[1], namespace=sys.argv[2], log_to_driver=False, configure_logging=False)
ray.get(get_owner(sys.argv[2], 0).ping.remote())
print("ready", flush=True)
time.sleep(86400)
"""


@dataclass
class Run:
    dag_id: str
    wall_s: float
    log: Path
    first_task_s: float = 0.0  # process start -> first task starts (parse, serialize, dag run)
    task_s: dict[str, float] = field(default_factory=dict)  # per task, "[DAG TEST] starting" -> "end"
    ray_wait_s: list[float] = field(default_factory=list)  # the provider's "finished after X s"
    worker_pids: set[str] = field(default_factory=set)

    @property
    def later_tasks_s(self) -> list[float]:
        return [v for k, v in self.task_s.items() if k != "t1"]


def parse_log(text: str, run: Run, started_at: float) -> None:
    starts: dict[str, float] = {}
    for line in text.splitlines():
        if m := TASK_LINE.match(line):
            ts = dt.datetime.fromisoformat(m[1]).timestamp()
            if m[2] == "starting":
                starts[m[3]] = ts
            elif m[3] in starts:
                run.task_s[m[3]] = ts - starts[m[3]]
        elif m := RAY_DONE.search(line):
            run.ray_wait_s.append(float(m[1]))
        elif m := WORKER_PID.search(line):
            run.worker_pids.add(m[1])
    if starts:
        run.first_task_s = min(starts.values()) - started_at


def verify(text: str, rc: int, dag_id: str, length: int, db: Path) -> None:
    done = [m for m in RUN_DONE.finditer(text) if m[1] == dag_id]
    if rc != 0 or not done:
        raise RuntimeError(f"{dag_id}: exit code {rc}, no finished DagRun in the log")
    run_id = done[-1][2]
    with sqlite3.connect(db) as conn:
        (state,) = conn.execute("SELECT state FROM dag_run WHERE dag_id=? AND run_id=?", (dag_id, run_id)).fetchone()
        row = conn.execute("SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id=? AND key='return_value'",
                           (dag_id, run_id, f"t{length}")).fetchone()
    value = None if row is None else json.loads(str(row[0]))
    if state != "success" or value != length:
        raise RuntimeError(f"{dag_id} {run_id}: state {state}, t{length} returned {value!r} (expected {length})")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="chain10-", dir=args.work_dir))
        self.logs = self.home / "logs"
        self.logs.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(HERE / "dags"),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{self.home}/airflow.db",
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        )
        self.env = env
        self.runs: dict[str, list[Run]] = {}
        self.warmup: list[Run] = []
        self.profile: dict[str, Any] | None = None
        self.head: dict[str, Any] = {}
        self.keeper: subprocess.Popen[str] | None = None
        self.count = 0

    def airflow(self, *argv: str) -> list[str]:
        return [str(BIN / "airflow"), *argv]

    def dags_test(self, dag_id: str, length: int, cmd: list[str] | None = None) -> Run:
        self.count += 1
        log = self.logs / f"{self.count:03d}-{dag_id}.log"
        started_at, t0 = time.time(), time.perf_counter()
        rc, text = sh(cmd or self.airflow("dags", "test", dag_id), self.env, self.args.timeout, log)
        run = Run(dag_id, time.perf_counter() - t0, log)
        verify(text, rc, dag_id, length, self.home / "airflow.db")
        parse_log(text, run, started_at)
        if dag_id.endswith("_ray") and len(run.ray_wait_s) != length:
            raise RuntimeError(f"{dag_id}: {len(run.ray_wait_s)} 'Ray task ... finished' lines, expected {length}")
        print(f"  {dag_id:14} {run.wall_s:6.2f}s  (first task at {run.first_task_s:.2f}s, t1 "
              f"{run.task_s.get('t1', 0):.2f}s, later tasks median {med(run.later_tasks_s):.3f}s)", flush=True)
        return run

    def interleaved(self, lengths: tuple[int, ...], rounds: int) -> None:
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            for length in lengths:
                for variant in ("plain", "ray"):
                    dag_id = f"chain{length}_{variant}"
                    self.runs.setdefault(dag_id, []).append(self.dags_test(dag_id, length))

    def start_head(self) -> None:
        t0 = time.perf_counter()
        head_env = {**self.env, **dict(kv.split("=", 1) for kv in self.args.head_env)}
        rc, out = sh([str(BIN / "airflow-ray"), "local", "start", "--json"], head_env, 300)
        if rc != 0:
            raise RuntimeError(f"airflow-ray local start failed (exit code {rc}): {out}")
        self.head = {"start_s": time.perf_counter() - t0, **json.loads(out.strip().splitlines()[-1])}
        print(f"Ray head at {self.head['address']} started in {self.head['start_s']:.1f}s", flush=True)
        if self.args.owner_keeper:
            self.keeper = subprocess.Popen([sys.executable, "-c", KEEPER, self.head["address"], "airflow"],
                                           env=self.keeper_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                           text=True, start_new_session=True)
            ready, _, _ = select.select([self.keeper.stdout], [], [], 120)
            if not ready or self.keeper.stdout.readline().strip() != "ready":
                raise RuntimeError("the owner keeper did not come up")
            print("owner keeper: the owner actor belongs to a driver that stays alive", flush=True)

    def keeper_env(self) -> dict[str, str]:
        """``self.env`` plus the embedded head's token, for a driver that calls ``ray.init`` itself."""
        from airflow_ray_provider.local_cluster import LocalRayCluster

        token = LocalRayCluster(self.home / "ray").auth_token()  # the head `airflow-ray local start` started
        env = {k: v for k, v in self.env.items() if not k.startswith("RAY_AUTH_")}
        # None: the head was started with RAY_AUTH_MODE=disabled (--head-env); then the driver must not send one.
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {"RAY_AUTH_MODE": "disabled"})
        return env

    def stop_head(self) -> None:
        if self.keeper is not None:
            self.keeper.terminate()
            try:
                self.keeper.wait(30)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
        rc, out = sh([str(BIN / "airflow-ray"), "local", "stop"], self.env, 120)
        print(f"airflow-ray local stop: {out.strip()} (exit code {rc})", flush=True)
        temp_dir = self.head.get("temp_dir", "")
        if rc == 0 and Path(temp_dir).name.startswith("airflow-ray-"):
            shutil.rmtree(temp_dir, ignore_errors=True)

    def main(self) -> int:
        a = self.args
        print(f"AIRFLOW_HOME={self.home}", flush=True)
        rc, out = sh(self.airflow("db", "migrate"), self.env, 600)
        if rc != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{out[-3000:]}")
        self.load = [os.getloadavg()[0]]
        self.commit = [provider_commit()]
        try:
            self.start_head()
            for r in range(a.warmup):
                print(f"warm-up {r + 1}/{a.warmup} (untimed)", flush=True)
                self.warmup += [self.dags_test("chain10_plain", 10), self.dags_test("chain10_ray", 10)]
            self.interleaved((10,), a.rounds)
            if a.scaling_rounds:
                self.interleaved((1, 20), a.scaling_rounds)
            if a.profile:
                print("profiled run (profile_ray_task.py, not part of the timings)", flush=True)
                run = self.dags_test("chain10_ray", 10, [sys.executable, str(HERE / "profile_ray_task.py"),
                                                         "chain10_ray"])
                line = [x for x in run.log.read_text().splitlines() if x.startswith("PROFILE_JSON ")][-1]
                self.profile = json.loads(line.split(" ", 1)[1])
        finally:
            self.stop_head()
        self.load.append(os.getloadavg()[0])
        self.commit.append(provider_commit())
        publish(self.report(), a.out)
        if not a.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)
        return 0

    # -- report ------------------------------------------------------------------
    def walls(self, dag_id: str) -> list[float]:
        return [r.wall_s for r in self.runs.get(dag_id, [])]

    def report(self) -> str:
        a = self.args
        plain, ray_ = self.walls("chain10_plain"), self.walls("chain10_ray")
        ratio = med(ray_) / med(plain)
        cmd = "python benchmarks/chain10.py " + " ".join(
            [f"--rounds {a.rounds}", f"--warmup {a.warmup}", f"--scaling-rounds {a.scaling_rounds}"]
            + (["--owner-keeper"] if a.owner_keeper else []) + [f"--head-env {kv}" for kv in a.head_env]
            + ([] if a.profile else ["--no-profile"]))
        lines = [
            "# chain10: `airflow dags test`, 10-task chain, plain `@task` vs `@task.ray`",
            "",
            f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            f"- Machine: `nproc` = {os.cpu_count()}, {cpu_model()}, {platform.system()} {platform.release()}; "
            f"1-min load average {self.load[0]:.2f} at start, {self.load[-1]:.2f} at end",
            f"- Python {platform.python_version()}, apache-airflow {metadata.version('apache-airflow')}, "
            f"ray {metadata.version('ray')}, airflow-ray-provider {metadata.version('airflow-ray-provider')} "
            f"(src/ at commit {self.commit[0]})" + ("" if self.commit[0] == self.commit[-1] else
                                             f" (**changed to {self.commit[-1]} during the run**)"),
            "- Setup: SQLite metadata DB in a fresh AIRFLOW_HOME, no `ray_default` connection (embedded head "
            "under `$AIRFLOW_HOME/ray`), `LOAD_EXAMPLES=False`, `RAY_USAGE_STATS_ENABLED=0`",
            f"- Ray head (`airflow-ray local start`): {self.head.get('start_s', float('nan')):.1f}s, not in the "
            "timings" + ("; **owner keeper on**: the owner actor is created by a driver that stays alive "
                         "(experiment, not the provider's default)" if a.owner_keeper else "")
            + (f"; **head started with** `{' '.join(a.head_env)}` (experiment)" if a.head_env else ""),
            f"- Reproduce (from the repo root, venv active): `{cmd}`",
            "",
            f"## Wall time per `airflow dags test` ({a.rounds} interleaved rounds after {a.warmup} warm-up)",
            "",
            "| DAG | runs | median | min | max | all runs (s) |",
            "|---|---|---|---|---|---|",
        ]
        for dag_id in ("chain10_plain", "chain10_ray"):
            w = self.walls(dag_id)
            lines.append(f"| `{dag_id}` | {len(w)} | {med(w):.2f}s | {min(w):.2f}s | {max(w):.2f}s | "
                         f"{', '.join(f'{x:.2f}' for x in w)} |")
        verdict = "meets" if ratio <= 1.3 else "misses"
        lines += [
            "",
            f"- **Ratio median(ray) / median(plain): {ratio:.2f}** ({verdict} the goal of at most 1.3)",
            f"- Overhead per task, (median(ray) - median(plain)) / 10: **{(med(ray_) - med(plain)) / 10:.3f}s**",
        ]
        if self.warmup:
            lines.append("- Warm-up (first runs in the fresh home; the first Ray run creates the owner actor): "
                         + ", ".join(f"`{r.dag_id}` {r.wall_s:.2f}s" for r in self.warmup))
        lines += ["", "## Where the time goes (from the task logs, medians over the timed runs)", "",
                  "| DAG | process start to first task | t1 | later tasks, each | provider's Ray wait, t1 "
                  "| Ray wait, later | Ray worker processes per run |",
                  "|---|---|---|---|---|---|---|"]
        for dag_id in ("chain10_plain", "chain10_ray"):
            rs = self.runs[dag_id]
            is_ray = dag_id.endswith("_ray")
            lines.append(
                f"| `{dag_id}` | {med([r.first_task_s for r in rs]):.2f}s | {med([r.task_s['t1'] for r in rs]):.3f}s "
                f"| {med([x for r in rs for x in r.later_tasks_s]):.3f}s | "
                + (f"{med([r.ray_wait_s[0] for r in rs]):.2f}s | {med([x for r in rs for x in r.ray_wait_s[1:]]):.2f}s "
                   f"| {med([len(r.worker_pids) for r in rs]):.0f} |" if is_ray else "- | - | - |"))
        rp, rr = self.runs["chain10_plain"], self.runs["chain10_ray"]
        per_task = med([x for r in rr for x in r.later_tasks_s]) - med([x for r in rp for x in r.later_tasks_s])
        first = med([r.task_s["t1"] for r in rr]) - med([r.task_s["t1"] for r in rp])
        lines += ["", "t1 includes Airflow's one-time start of the in-process execution API, in both variants.",
                  f"From these logs, Ray costs **{per_task:.3f}s more per task** (later tasks) and its first task "
                  f"{first:.2f}s more than plain t1, i.e. **about {first - per_task:.2f}s once per process** "
                  "(connect, owner lookup, first `ray.put`) on top of the per-task cost."]
        if a.scaling_rounds:
            lines += self.scaling()
        if self.profile:
            lines += self.profile_table()
        return "\n".join(lines) + "\n"

    def scaling(self) -> list[str]:
        out = ["", f"## One-time vs per-task cost (chain1 and chain20, {self.args.scaling_rounds} interleaved rounds)",
               "", "| variant | chain1 median | chain10 median | chain20 median | per task (20 - 1) / 19 | one-time "
               "(chain1 - per task) |", "|---|---|---|---|---|---|"]
        fits = {}
        for variant in ("plain", "ray"):
            t1, t10, t20 = (med(self.walls(f"chain{n}_{variant}")) for n in (1, 10, 20))
            slope = (t20 - t1) / 19
            fits[variant] = (slope, t1 - slope)
            out.append(f"| {variant} | {t1:.2f}s | {t10:.2f}s | {t20:.2f}s | {slope:.3f}s | {t1 - slope:.2f}s |")
        (sp, ip), (sr, ir) = fits["plain"], fits["ray"]
        out += ["", f"- Linear fit, Ray minus plain: {sr - sp:.3f}s per task and {ir - ip:.2f}s fixed per `dags test` "
                "process (a rough split: each point is a median of few noisy runs; the log-based split above is "
                "more direct)"]
        return out

    def profile_table(self) -> list[str]:
        p = self.profile or {}
        out = ["", "## Provider calls in one profiled `chain10_ray` run (`benchmarks/profile_ray_task.py`)", "",
               f"`import ray` cold in a fresh process: {p.get('import_ray_s', 0):.2f}s (in `dags test` it happens "
               "while parsing the DAGs folder, for both variants).", "",
               "| call | calls | first call | later calls, median | total |", "|---|---|---|---|---|"]
        for row in p.get("rows", []):
            later = "-" if row["later_median_s"] is None else f"{row['later_median_s'] * 1000:.1f} ms"
            out.append(f"| `{row['call'].strip()}` | {row['calls']} | {row['first_s'] * 1000:.1f} ms | {later} | "
                       f"{row['total_s']:.2f}s |")
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds of chain10 (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--scaling-rounds", type=int, default=2, help="rounds of chain1/chain20 (default 2; 0 skips)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled Ray run")
    p.add_argument("--owner-keeper", action="store_true",
                   help="experiment: create the owner actor from a driver that stays alive during the runs")
    p.add_argument("--head-env", action="append", default=[], metavar="KEY=VALUE",
                   help="experiment: extra environment for `airflow-ray local start` (Ray system config)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per subprocess (default 900)")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work", help="parent of the temp AIRFLOW_HOME")
    p.add_argument("--keep-home", action="store_true", help="keep the AIRFLOW_HOME (logs, DB) afterwards")
    p.add_argument("--out", type=Path,
                   help="Markdown output (default benchmarks/results/chain10[-owner-keeper][-head-env].md)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if any("=" not in kv for kv in args.head_env):
        p.error("--head-env takes KEY=VALUE")
    suffix = ("-owner-keeper" if args.owner_keeper else "") + ("-head-env" if args.head_env else "")
    args.out = args.out or HERE / "results" / f"chain10{suffix}.md"
    return args


if __name__ == "__main__":
    sys.exit(Bench(parse_args()).main())
