"""xcom_handoff: hand a large value from one ``@task.ray`` to the next, per XCom backend, side by side.

Payloads: a float64 numpy array of ``--array-mib`` MiB and a pandas DataFrame of ``--rows`` rows
(int64 ``id``, float64 ``x`` and ``y``), plus a tiny 3-float list as each backend's baseline.
Backends, each with its own AIRFLOW_HOME (SQLite) so its config is clean:

* ``ray``: ``airflow_ray_provider.xcom.RayXComBackend`` (the result stays in Ray's object store),
* ``common-io``: ``XComObjectStorageBackend`` from apache-airflow-providers-common-io, on a local
  ``file://`` path, threshold 0 (every value goes to a file),
* ``db``: Airflow's default ``BaseXCom`` (the value is serialized into the metadata DB).

Every run is the real CLI, ``airflow dags test xcom_handoff -c '{"kind": ..., "size": ...}'``
(DAG: ``benchmarks/dags/xcom_handoff_dag.py``), in a subprocess. All backends share one Ray head,
started once with ``airflow-ray local start`` and handed to every run as the ``ray_default``
connection (one Ray namespace per backend). Runs are interleaved: for each repeat, for each
payload, every backend in turn. It measures, per run:

* handoff = (producer task-instance duration - producer compute) + (consumer TI duration -
  consumer compute); TI start/end come from the metadata DB, the compute times (the callables'
  own ``time.perf_counter`` around building / summing the payload) from ``XCOM_BENCH`` lines the
  callables print into the task log. A no-op ``@task.ray`` ``warm`` task runs before the producer,
  so the process's one-time costs (Airflow's in-process execution API, the Ray connect) are not
  in the producer's duration;
* added latency = median handoff(payload) - median handoff(tiny), same backend;
* peak RSS of the Airflow worker: ``airflow dags test`` runs the tasks in its own process, so this
  is the kernel's high-water mark (``ru_maxrss`` from ``wait4`` on that process: its largest
  process, itself or a reaped descendant); a 50 ms psutil poll of its process tree (sum, Ray
  processes excluded) is reported next to it. RSS growth = median peak(payload) - median peak(tiny).

A payload a backend cannot hold (serialization refused, DB error, killed, timeout) is recorded
with the reason from the task log and not retried in later repeats (``--retry-failed`` retries).
Ray-held results of the ``ray`` backend are released after each run (``airflow-ray xcom gc``,
not timed), so repeats do not fill the object store.

    python benchmarks/xcom_handoff.py                      # 1 GiB array, 10M rows, 3 repeats, all backends
    python benchmarks/xcom_handoff.py --array-mib 16 --rows 200000 --repeats 1   # quick check
    python benchmarks/xcom_handoff.py --backends ray common-io --payloads frame
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import psutil
from benchutil import cpu_model, med, provider_commit, publish, sh

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DAG_ID = "xcom_handoff"
MARKER = "XCOM_BENCH "
BACKENDS = ("ray", "common-io", "db")
PAYLOADS = ("array", "frame")
BACKEND_CLASS = {
    "ray": "airflow_ray_provider.xcom.RayXComBackend",
    "common-io": "airflow.providers.common.io.xcom.backend.XComObjectStorageBackend",
    "db": "airflow.sdk.bases.xcom.BaseXCom (default)",
}
GOAL_RATIO, GOAL_ADDED_S, GOAL_RSS_MB = 20.0, 0.2, 100.0
MB = 1_000_000
EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Lost|Failed|Cancelled|Interrupt|Warning)\w*)"
                      r"(?:: (.*))?$")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(\w+)")
WORKER_PID = re.compile(r"Running on Ray node .* worker pid (\d+)")


@dataclass
class Run:
    backend: str
    kind: str
    size: int
    repeat: int  # 0 = warm-up
    log: Path
    ok: bool = False
    reason: str = ""
    wall_s: float = 0.0
    maxrss_b: int = 0  # ru_maxrss of the dags test process (largest process of its tree)
    tree_peak_b: int = 0  # polled peak of the summed RSS of its process tree (Ray processes excluded)
    ti_s: dict[str, float] = field(default_factory=dict)  # task_id -> TI duration (end - start)
    compute_s: dict[str, float] = field(default_factory=dict)  # task_id -> the callable's own timing
    consumer_type: str = ""
    worker_pid: dict[str, str] = field(default_factory=dict)  # task_id -> Ray worker pid

    def side(self, task_id: str) -> float:
        return self.ti_s[task_id] - self.compute_s[task_id]

    @property
    def handoff_s(self) -> float:
        return self.side("produce") + self.side("consume")


@dataclass
class Measured:
    rc: int
    wall_s: float
    maxrss_b: int
    tree_peak_b: int
    timed_out: bool


def is_ray_process(proc: psutil.Process) -> bool:
    try:
        name = proc.name()
        cmd = " ".join(proc.cmdline()[:3])
    except psutil.Error:
        return False
    return name.startswith("ray::") or any(s in cmd for s in ("raylet", "gcs_server", "ray/_private", "ray.util"))


def run_measured(cmd: list[str], env: dict[str, str], timeout: float, log: Path, poll_s: float = 0.05) -> Measured:
    """Run ``cmd`` in its own session, sampling its tree's RSS; reap it with ``wait4`` for ``ru_maxrss``."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    root = psutil.Process(proc.pid)
    peak = 0
    timed_out = False
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = [root]
            for p in procs:
                if p.pid != root.pid and is_ray_process(p):
                    continue
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            time.sleep(poll_s)
    except BaseException:  # Ctrl-C: do not leave the run behind in its own session
        os.killpg(proc.pid, signal.SIGKILL)
        os.wait4(proc.pid, 0)
        proc.returncode = -9
        raise
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Measured(proc.returncode, wall, usage.ru_maxrss * 1024, peak, timed_out)  # ru_maxrss is KiB on Linux


def markers(text: str) -> list[dict[str, object]]:
    found = []
    decoder = json.JSONDecoder()
    for line in text.splitlines():
        i = line.find(MARKER)
        if i >= 0:
            try:
                found.append(decoder.raw_decode(line, i + len(MARKER))[0])
            except ValueError:
                continue
    return found


def worker_pids(text: str) -> dict[str, str]:
    """task_id -> the Ray worker pid its task ran in (from the provider's "Running on Ray node" line)."""
    current, pids = "", {}
    for line in text.splitlines():
        if m := TASK_START.search(line):
            current = m[1]
        elif (m := WORKER_PID.search(line)) and current:
            pids[current] = m[1]
    return pids


def shorten(reason: str, limit: int = 200) -> str:
    """Keep a long exception message to its first sentence (and at most ``limit`` characters)."""
    if len(reason) > limit and (cut := reason.find(". ", 40)) > 0:
        reason = reason[:cut + 1]
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def failure_reason(text: str) -> str:
    """The exception a failed task logged (last line of its traceback), shortened."""
    lines = text.splitlines()
    reasons = []
    for i, line in enumerate(lines):
        if "Task failed with exception" not in line:
            continue
        last = ""
        for follow in lines[i + 1:]:
            if LOG_LINE.match(follow):
                break
            if follow.startswith((" ", "\t")):
                continue  # traceback frames
            if m := EXC_LINE.match(follow.strip()):
                last = f"{m[1].rsplit('.', 1)[-1]}: {m[2] or ''}".rstrip(": ")
        reasons.append(last or "task failed (no exception line in the log)")
    if not reasons:
        errors = [x for x in lines if "[error" in x]
        return shorten(errors[-1]) if errors else ""
    return shorten(reasons[0])


def parse_ts(value: str | None) -> dt.datetime:
    if not value:
        raise ValueError("missing timestamp")
    return dt.datetime.fromisoformat(value)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="xcom-handoff-", dir=args.work_dir))
        self.head_home = self.work / "ray-head"
        self.head: dict[str, object] = {}
        self.events: list[str] = []
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        self.base_env.update(AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__DAGS_FOLDER=str(HERE / "dags"),
                             RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{self.base_env.get('PATH', '')}")
        self.envs: dict[str, dict[str, str]] = {}
        self.runs: list[Run] = []
        self.count = 0
        self.sizes = {"tiny": 0, "array": args.array_mib, "frame": args.rows}
        self.raw: dict[str, list[dict[str, float]]] = {}  # kind -> raw Ray baseline runs (raw_handoff.py)

    # -- setup ---------------------------------------------------------------------
    def home(self, backend: str) -> Path:
        return self.work / backend

    def backend_env(self, backend: str) -> dict[str, str]:
        home = self.home(backend)
        env = dict(self.base_env, AIRFLOW_HOME=str(home),
                   AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db")
        if backend == "ray":
            env["AIRFLOW__CORE__XCOM_BACKEND"] = BACKEND_CLASS["ray"]
        elif backend == "common-io":
            store = home / "xcom-objects"
            store.mkdir(parents=True, exist_ok=True)
            env.update(AIRFLOW__CORE__XCOM_BACKEND=BACKEND_CLASS["common-io"],
                       AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH=f"file://{store}",
                       AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_THRESHOLD="0")
        return env

    def set_connection(self) -> None:
        from airflow_ray_provider.local_cluster import LocalRayCluster

        # The head requires its token (token auth is the default): clients give it as the connection's password.
        token = LocalRayCluster(self.head_home).auth_token()
        for backend, env in self.envs.items():
            extra = {"address": self.head["address"], "namespace": f"xcom-bench-{backend}"}
            conn: dict[str, object] = {"conn_type": "ray", "extra": extra}
            if token:
                conn["password"] = token
            env["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps(conn)

    def airflow_ray(self, *argv: str) -> list[str]:
        return [str(BIN / "airflow-ray"), *argv]

    def start_head(self) -> None:
        t0 = time.perf_counter()
        rc, out = sh(self.airflow_ray("local", "start", "--home", str(self.head_home), "--json"), self.base_env, 300)
        if rc != 0:
            raise RuntimeError(f"airflow-ray local start failed (exit code {rc}): {out}")
        rc, out = sh(self.airflow_ray("local", "status", "--home", str(self.head_home), "--json"), self.base_env, 120)
        if rc != 0:
            raise RuntimeError(f"airflow-ray local status after start: exit code {rc}: {out}")
        self.head = {"start_s": time.perf_counter() - t0, **json.loads(out.strip().splitlines()[-1])}
        self.set_connection()
        print(f"Ray head at {self.head['address']} ({self.head_home}) started in {self.head['start_s']:.1f}s",
              flush=True)

    def ensure_head(self) -> None:
        rc, _ = sh(self.airflow_ray("local", "status", "--home", str(self.head_home), "--json"), self.base_env, 120)
        if rc != 0:
            note = f"the Ray head was found dead before run {self.count + 1} and restarted"
            print(f"  WARNING: {note}", flush=True)
            self.events.append(note)
            self.start_head()

    def stop_head(self) -> None:
        rc, out = sh(self.airflow_ray("local", "stop", "--home", str(self.head_home)), self.base_env, 120)
        print(f"airflow-ray local stop: {out.strip()} (exit code {rc})", flush=True)

    def migrate(self, backend: str) -> None:
        home = self.home(backend)
        home.mkdir(parents=True, exist_ok=True)
        (home / "run-logs").mkdir(exist_ok=True)
        self.envs[backend] = self.backend_env(backend)
        rc, out = sh([str(BIN / "airflow"), "db", "migrate"], self.envs[backend], 900)
        if rc != 0:
            raise RuntimeError(f"airflow db migrate ({backend}) failed:\n{out[-3000:]}")

    # -- one run -------------------------------------------------------------------
    def dags_test(self, backend: str, kind: str, repeat: int) -> Run:
        self.ensure_head()
        self.count += 1
        size = self.sizes[kind]
        home = self.home(backend)
        run = Run(backend, kind, size, repeat, home / "run-logs" / f"{self.count:03d}-{kind}.log")
        conf = json.dumps({"kind": kind, "size": size})
        db = home / "airflow.db"
        before = self.last_run_id(db)
        m = run_measured([str(BIN / "airflow"), "dags", "test", DAG_ID, "-c", conf], self.envs[backend],
                         self.args.timeout, run.log)
        run.wall_s, run.maxrss_b, run.tree_peak_b = m.wall_s, m.maxrss_b, m.tree_peak_b
        text = run.log.read_text(errors="replace")
        try:
            self.check(run, m, text, db, before)
        except RuntimeError as exc:
            run.reason = str(exc)
        gc = self.release_ray_objects(backend) if backend == "ray" else ""
        label = "warm-up" if repeat == 0 else f"repeat {repeat}"
        what = (f"handoff {run.handoff_s:7.3f}s (producer {run.side('produce'):.3f}s, consumer "
                f"{run.side('consume'):.3f}s)" if run.ok else f"FAILED: {run.reason}")
        print(f"  [{label}] {kind:5} {backend:9} {what}; peak RSS {run.maxrss_b / MB:.0f} MB; wall {run.wall_s:.1f}s"
              + (f"; gc: {gc}" if gc else ""), flush=True)
        return run

    @staticmethod
    def last_run_id(db: Path) -> str | None:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT run_id FROM dag_run WHERE dag_id=? ORDER BY id DESC LIMIT 1",
                               (DAG_ID,)).fetchone()
        return None if row is None else str(row[0])

    def check(self, run: Run, m: Measured, text: str, db: Path, before: str | None) -> None:
        """Fill ``run`` from the DB and the log; raise RuntimeError with a short reason if it failed."""
        if m.timed_out:
            raise RuntimeError(f"timed out after {self.args.timeout:.0f}s")
        if m.rc < 0:
            name = signal.Signals(-m.rc).name
            raise RuntimeError(f"`airflow dags test` killed by {name}" + (" (out of memory?)" if m.rc == -9 else ""))
        run_id = self.last_run_id(db)
        if run_id is None or run_id == before:
            raise RuntimeError(f"no new DagRun (exit code {m.rc}): {failure_reason(text) or 'see ' + str(run.log)}")
        with sqlite3.connect(db) as conn:
            (state,) = conn.execute("SELECT state FROM dag_run WHERE dag_id=? AND run_id=?",
                                    (DAG_ID, run_id)).fetchone()
            tis = conn.execute("SELECT task_id, state, start_date, end_date FROM task_instance "
                               "WHERE dag_id=? AND run_id=?", (DAG_ID, run_id)).fetchall()
        states = {task_id: ti_state for task_id, ti_state, _, _ in tis}
        if m.rc != 0 or state != "success":
            failed = [t for t, s in states.items() if s in ("failed", "up_for_retry")]
            where = f" (task {', '.join(failed)})" if failed else ""
            raise RuntimeError(f"{failure_reason(text) or f'exit code {m.rc}, DagRun {state}'}{where}")
        for task_id, _, start, end in tis:
            run.ti_s[task_id] = (parse_ts(end) - parse_ts(start)).total_seconds()
        run.worker_pid = worker_pids(text)
        for mark in markers(text):
            run.compute_s[str(mark["task"])] = float(mark["compute_s"])  # type: ignore[arg-type]
            if mark["task"] == "consume":
                run.consumer_type = str(mark.get("type"))
                expected = {"tiny": 3, "array": run.size * 2**20 // 8, "frame": run.size}[run.kind]
                if mark.get("n") != expected:
                    raise RuntimeError(f"consumer saw {mark.get('n')} elements, expected {expected}")
        missing = ({"produce", "consume"} - set(run.compute_s)) | ({"produce", "consume"} - set(run.ti_s))
        if missing:
            raise RuntimeError(f"no {MARKER.strip()} line or TI times for {sorted(missing)} in {run.log}")
        run.ok = True

    def release_ray_objects(self, backend: str) -> str:
        """Let Ray free what the run left in the object store (rows of finished runs; not timed)."""
        rc, out = sh(self.airflow_ray("xcom", "gc", "--retention", "0", "--grace", "0"), self.envs[backend], 300)
        if rc != 0:
            note = f"`airflow-ray xcom gc` after run {self.count} failed (exit code {rc}): {out.strip()[-300:]}"
            print(f"  WARNING: {note}", flush=True)
            self.events.append(note)
            return "failed"
        m = re.search(r"released \d+", out)
        return m[0] if m else out.strip()[-100:]

    def raw_ray(self, kind: str) -> None:
        """The same producer and consumer as plain Ray tasks from one driver, on the same head (raw_handoff.py)."""
        from airflow_ray_provider.local_cluster import LocalRayCluster

        token = LocalRayCluster(self.head_home).auth_token()
        env = dict(self.base_env, **({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {}))
        rc, out = sh([sys.executable, str(HERE / "raw_handoff.py"), str(self.head["address"]), kind,
                      str(self.sizes[kind])], env, self.args.timeout)
        lines = [line for line in out.splitlines() if line.startswith("RAW_HANDOFF ")]
        if rc != 0 or not lines:
            note = f"raw Ray baseline for {kind} failed (exit code {rc}): {out.strip()[-300:]}"
            print(f"  WARNING: {note}", flush=True)
            self.events.append(note)
            return
        run = json.loads(lines[-1].split(" ", 1)[1])
        self.raw.setdefault(kind, []).append(run)
        print(f"  [raw Ray] {kind:5} handoff {run['handoff_s']:7.3f}s (producer {run['producer_s']:.3f}s, "
              f"consumer {run['consumer_s']:.3f}s)", flush=True)

    # -- the benchmark -------------------------------------------------------------
    def skip_reason(self, backend: str, kind: str) -> str | None:
        if self.args.retry_failed:
            return None
        for r in self.runs:
            if (r.backend, r.kind) == (backend, kind) and r.repeat > 0 and not r.ok:
                return r.reason
        return None

    def main(self) -> int:
        a = self.args
        self.started = dt.datetime.now(dt.UTC)
        self.load = [os.getloadavg()[0]]
        self.commit = [provider_commit()]
        print(f"work dir {self.work}", flush=True)
        for backend in a.backends:
            print(f"airflow db migrate ({backend})", flush=True)
            self.migrate(backend)
        try:
            self.start_head()
            for w in range(a.warmup):
                print(f"warm-up {w + 1}/{a.warmup} (tiny payload, untimed)", flush=True)
                for backend in a.backends:
                    self.runs.append(self.dags_test(backend, "tiny", 0))
            for repeat in range(1, a.repeats + 1):
                print(f"repeat {repeat}/{a.repeats}", flush=True)
                for kind in ("tiny", *a.payloads):
                    # The raw baseline runs before the Airflow runs in odd repeats, after them in even ones: the
                    # first 1 GiB written into fresh object-store pages is slower, whoever writes it.
                    if not a.no_raw and repeat % 2 == 1:
                        self.raw_ray(kind)
                    for backend in a.backends:
                        reason = self.skip_reason(backend, kind)
                        if reason is not None:
                            print(f"  [repeat {repeat}] {kind:5} {backend:9} skipped (failed before: {reason})",
                                  flush=True)
                            continue
                        self.runs.append(self.dags_test(backend, kind, repeat))
                    if not a.no_raw and repeat % 2 == 0:
                        self.raw_ray(kind)
        finally:
            self.stop_head()
        self.load.append(os.getloadavg()[0])
        self.commit.append(provider_commit())
        publish(self.report(), a.out)
        if a.keep_home:
            print(f"kept {self.work} (AIRFLOW_HOMEs, run logs under <backend>/run-logs)")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0

    # -- report --------------------------------------------------------------------
    def timed(self, backend: str, kind: str) -> list[Run]:
        return [r for r in self.runs if r.repeat > 0 and (r.backend, r.kind) == (backend, kind)]

    def stats(self, backend: str, kind: str) -> dict[str, float] | None:
        ok = [r for r in self.timed(backend, kind) if r.ok]
        if not ok:
            return None
        return {"handoff": med([r.handoff_s for r in ok]), "producer": med([r.side("produce") for r in ok]),
                "consumer": med([r.side("consume") for r in ok]),
                "produce_compute": med([r.compute_s["produce"] for r in ok]),
                "consume_compute": med([r.compute_s["consume"] for r in ok]),
                "rss": med([r.maxrss_b / MB for r in ok]), "tree": med([r.tree_peak_b / MB for r in ok]),
                "wall": med([r.wall_s for r in ok]), "n": len(ok)}

    def failure(self, backend: str, kind: str) -> str:
        bad = [r for r in self.timed(backend, kind) if not r.ok]
        return bad[0].reason if bad else "no run"

    def label(self, kind: str) -> str:
        if kind == "array":
            return f"array {self.args.array_mib} MiB"
        if kind == "frame":
            return f"frame {self.args.rows:,} rows"
        return "tiny (baseline)"

    def report(self) -> str:
        a = self.args
        cmd = shlex.join([sys.executable, *sys.argv])
        mem = psutil.virtual_memory().total
        lines = [
            "# xcom_handoff: large values between `@task.ray` tasks, per XCom backend",
            "",
            f"- Command: `{cmd}` (cwd `{Path.cwd()}`)",
            f"- Date: {self.started:%Y-%m-%d %H:%M} UTC",
            f"- Machine: {os.cpu_count()} cores (`nproc`), {cpu_model()}, {mem / 2**30:.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}; 1-min load average {self.load[0]:.2f} at start, "
            f"{self.load[-1]:.2f} at end",
            f"- Python {platform.python_version()}, " + ", ".join(
                f"{p} {version(p)}" for p in ("apache-airflow", "apache-airflow-providers-common-io", "ray",
                                              "numpy", "pandas", "pyarrow", "airflow-ray-provider"))
            + f" (src/ at {self.commit[0]}" + ("" if self.commit[0] == self.commit[-1] else
                                               f"; **changed to {self.commit[-1]} during the run**") + ")",
            f"- Payloads: float64 numpy array of {a.array_mib} MiB; DataFrame of {a.rows:,} rows (int64 `id`, "
            "float64 `x`, `y`; "
            f"{a.rows * 24 / 2**20:.0f} MiB); tiny = `[1.0, 2.0, 3.0]`. {a.repeats} repeat(s) after {a.warmup} "
            "untimed warm-up run(s) per backend; medians over the repeats.",
            "- Backends: " + "; ".join(f"`{b}` = `{BACKEND_CLASS[b]}`" for b in a.backends)
            + ("; common-io writes to a local `file://` path with threshold 0" if "common-io" in a.backends else ""),
            f"- Setup: `airflow dags test` per run (tasks run in that process), SQLite per backend, one shared Ray "
            f"head (`airflow-ray local start`, {self.head.get('start_s', float('nan')):.1f}s, not timed) as the "
            "`ray_default` connection, one Ray namespace per backend; DAG `warm >> produce >> consume` "
            "(`benchmarks/dags/xcom_handoff_dag.py`): the no-op `warm` task takes the process's one-time costs "
            "(in-process execution API, Ray connect), so the producer's TI duration does not include them. "
            "The consumer runs in the same process as the producer, so a backend's imports are paid once, by "
            "the producer: for `db` and `common-io` the Airflow process fetches the value from Ray and unpickles "
            "it (for a DataFrame that imports pandas) and serde imports pyarrow. Those imports are part of their "
            "handoff and RSS, as in a real task process, and dominate at small sizes.",
            "",
            "handoff = (producer TI duration - producer compute) + (consumer TI duration - consumer compute); "
            "added latency = handoff(payload) - handoff(tiny); ratio = handoff(common-io) / handoff(this backend); "
            "RSS growth = peak RSS of the `airflow dags test` process (ru_maxrss) with the payload - with tiny. "
            "1 MB = 10^6 bytes.",
            "",
            "| payload | backend | runs | handoff (s) | added latency (s) | ratio vs common-io (handoff) "
            "| ratio vs common-io (added latency) | peak RSS growth (MB) | notes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for kind in ("tiny", *a.payloads):
            for backend in a.backends:
                lines.append(self.row(kind, backend))
        lines += ["", "## Goals (`ray` backend; stated for a 1 GiB array and a 10-million-row DataFrame)", ""]
        if (a.array_mib, a.rows) != (1024, 10_000_000):
            lines += [f"**Measured at {a.array_mib} MiB / {a.rows:,} rows, not at the goals' sizes: the verdicts "
                      "below are for these sizes only.**", ""]
        lines += self.goals()
        lines += self.over_raw()
        lines += ["", "## Details (medians)", "",
                  "| payload | backend | producer TI - compute (s) | consumer TI - compute (s) | producer compute (s) "
                  "| consumer compute (s) | consumer got | same Ray worker | peak RSS (MB) | polled tree peak (MB) "
                  "| `dags test` wall (s) | handoff of each run (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind in ("tiny", *a.payloads):
            for backend in a.backends:
                s = self.stats(backend, kind)
                if s is None:
                    continue
                ok = [r for r in self.timed(backend, kind) if r.ok]
                lines.append(f"| {self.label(kind)} | `{backend}` | {s['producer']:.3f} | {s['consumer']:.3f} | "
                             f"{s['produce_compute']:.3f} | {s['consume_compute']:.3f} | "
                             f"{', '.join(sorted({r.consumer_type for r in ok}))} | {same_worker(ok)} | "
                             f"{s['rss']:.0f} | {s['tree']:.0f} | "
                             f"{s['wall']:.1f} | {', '.join(f'{r.handoff_s:.3f}' for r in ok)} |")
        warm = [r for r in self.runs if r.repeat == 0]
        if warm:
            lines += ["", "Warm-up runs (untimed, first use of each home and namespace): " + ", ".join(
                f"`{r.backend}` " + (f"handoff {r.handoff_s:.2f}s, wall {r.wall_s:.1f}s" if r.ok else
                                      f"FAILED: {r.reason}") for r in warm)]
        if self.events:
            lines += ["", "Events: " + "; ".join(self.events)]
        return "\n".join(lines) + "\n"

    def row(self, kind: str, backend: str) -> str:
        s = self.stats(backend, kind)
        runs = self.timed(backend, kind)
        n_ok = sum(r.ok for r in runs)
        head = f"| {self.label(kind)} | `{backend}` | {n_ok}/{len(runs)} |"
        if s is None:
            base = self.stats(backend, "tiny")
            verb = "cannot hold it" if base is not None and kind != "tiny" else "failed"
            return head + f" - | - | - | - | - | {verb}: {md(self.failure(backend, kind))} |"
        notes = [] if n_ok == len(runs) else [f"{len(runs) - n_ok} failed: {md(self.failure(backend, kind))}"]
        if kind == "tiny":
            return head + (f" {s['handoff']:.3f} | baseline | - | - | baseline (peak {s['rss']:.0f} MB) | "
                           f"{'; '.join(notes)} |")
        base = self.stats(backend, "tiny")
        added = s["handoff"] - base["handoff"] if base else float("nan")
        growth = s["rss"] - base["rss"] if base else float("nan")
        ref = self.stats("common-io", kind) if "common-io" in self.args.backends else None
        ref_base = self.stats("common-io", "tiny") if ref else None
        if backend == "common-io" or ref is None:
            ratio = ratio_added = "-" if backend == "common-io" else "n/a (common-io has no result)"
        else:
            ratio = f"{ref['handoff'] / s['handoff']:.1f}x"
            ref_added = ref["handoff"] - ref_base["handoff"] if ref_base else float("nan")
            ratio_added = f"{ref_added / added:.1f}x" if added > 0 else f"n/a (added latency {signed(added, 3)}s)"
        return head + (f" {s['handoff']:.3f} | {signed(added, 3)} | {ratio} | {ratio_added} | {signed(growth, 0)} | "
                       f"{'; '.join(notes)} |")

    def over_raw(self) -> list[str]:
        """The `ray` backend against the same two functions as plain Ray tasks (issue goal: the physical limit)."""
        if "ray" not in self.args.backends or not self.raw:
            return []
        out = ["", "## Against raw Ray (the same producer and consumer as plain Ray tasks, one driver)", "",
               "raw handoff = (producer latency - compute) + (consumer latency - compute), latency from `f.remote()` "
               "to ready, measured by `benchmarks/raw_handoff.py` on the same head, before each payload's Airflow "
               "runs in odd repeats and after them in even ones. *Over raw* = handoff(`ray` backend) - raw "
               "handoff; it includes the fixed cost of two Airflow task instances. *Size-dependent* = over raw "
               "(payload) - over raw (tiny): what the provider adds "
               "because the value is large (goals: under 0.1 s at 256 MiB, under 0.2 s at 1 GiB).", "",
               "| payload | raw Ray handoff (s) | provider handoff (s) | over raw (s) | size-dependent (s) | "
               "raw runs (s) |", "|---|---|---|---|---|---|"]
        base_over = None
        for kind in ("tiny", *self.args.payloads):
            s, raw = self.stats("ray", kind), self.raw.get(kind)
            if s is None or not raw:
                continue
            raw_h = med([r["handoff_s"] for r in raw])
            over = s["handoff"] - raw_h
            if kind == "tiny":
                base_over = over
            dep = "baseline" if kind == "tiny" else (signed(over - base_over, 3) if base_over is not None else "-")
            runs = ", ".join(f"{r['handoff_s']:.3f}" for r in raw)
            out.append(f"| {self.label(kind)} | {raw_h:.3f} | {s['handoff']:.3f} | {signed(over, 3)} | {dep} | "
                       f"{runs} |")
        return out

    def goals(self) -> list[str]:
        a = self.args
        if "ray" not in a.backends:
            return ["The `ray` backend was not run."]
        out = []
        base = self.stats("ray", "tiny")
        for kind in a.payloads:
            s = self.stats("ray", kind)
            name = self.label(kind)
            if s is None or base is None:
                out.append(f"- {name}: the `ray` backend has no result ({md(self.failure('ray', kind))}); "
                           "no goal can be judged")
                continue
            ref = self.stats("common-io", kind) if "common-io" in a.backends else None
            if ref is None:
                why = md(self.failure("common-io", kind)) if "common-io" in a.backends else "not run"
                out.append(f"- {name}: at least {GOAL_RATIO:.0f}x faster than common-io: **not measurable** "
                           f"(common-io: {why})")
            else:
                ratio = ref["handoff"] / s["handoff"]
                out.append(f"- {name}: at least {GOAL_RATIO:.0f}x faster than common-io: "
                           f"**{verdict(ratio >= GOAL_RATIO)}** ({ref['handoff']:.3f}s / {s['handoff']:.3f}s "
                           f"= {ratio:.1f}x)")
            added = s["handoff"] - base["handoff"]
            out.append(f"- {name}: under {GOAL_ADDED_S}s added latency per handoff: "
                       f"**{verdict(added < GOAL_ADDED_S)}** ({signed(added, 3)}s)")
            growth = s["rss"] - base["rss"]
            out.append(f"- {name}: Airflow worker peak RSS grows by under {GOAL_RSS_MB:.0f} MB: "
                       f"**{verdict(growth < GOAL_RSS_MB)}** ({signed(growth, 0)} MB)")
        return out


def signed(value: float, digits: int) -> str:
    text = f"{value:+.{digits}f}"
    return "+" + text[1:] if float(text) == 0 else text  # no "-0"


def same_worker(runs: list[Run]) -> str:
    same = sum(1 for r in runs if r.worker_pid.get("produce") and
               r.worker_pid.get("produce") == r.worker_pid.get("consume"))
    return f"{same}/{len(runs)}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--array-mib", type=int, default=1024, help="size of the numpy array in MiB (default 1024)")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the DataFrame (default 10,000,000)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default 3)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   help="XCom backends to compare (default: all three)")
    p.add_argument("--payloads", nargs="+", choices=PAYLOADS, default=list(PAYLOADS),
                   help="large payloads (default: both; the tiny baseline always runs)")
    p.add_argument("--warmup", type=int, default=1, help="untimed tiny runs per backend first (default 1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per `airflow dags test` (default 1800)")
    p.add_argument("--no-raw", action="store_true", help="skip the raw Ray baseline (raw_handoff.py)")
    p.add_argument("--retry-failed", action="store_true",
                   help="run a payload again in later repeats even after a backend failed to hold it")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work", help="parent of the temp AIRFLOW_HOMEs")
    p.add_argument("--keep-home", action="store_true", help="keep the AIRFLOW_HOMEs and run logs afterwards")
    p.add_argument("--out", type=Path, default=HERE / "results" / "xcom_handoff.md",
                   help="Markdown results file (default benchmarks/results/xcom_handoff.md)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.array_mib < 1 or args.rows < 1 or args.warmup < 0:
        p.error("--repeats, --array-mib and --rows must be at least 1, --warmup at least 0")
    args.backends = list(dict.fromkeys(args.backends))
    args.payloads = list(dict.fromkeys(args.payloads))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return args


if __name__ == "__main__":
    sys.exit(Bench(parse_args()).main())
