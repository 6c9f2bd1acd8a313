"""``make test`` on a fresh clone, as CI runs it, timed per tier; optionally with both cores kept busy.

    python benchmarks/suite_tiers.py --dest /work/suite-idle
    python benchmarks/suite_tiers.py --dest /work/suite-loaded --stress 2   # stress-ng --cpu 2 alongside

Clones the committed HEAD (what CI sees) into ``--dest``, runs ``make test`` there, and appends to
``benchmarks/results/suite_tiers.md``: the wall time, the exit status, each tier's wall time (the
``.test-times`` file the Makefile writes) and the slowest tests with the machine's busy CPU seconds
during each (tests/conftest.py, ``AIRFLOW_RAY_TEST_CPU_REPORT``; shared between tests that overlap).
``--stress N`` keeps N cores busy with Debian's ``stress-ng --cpu N`` for the whole run (a Python busy
loop per core where stress-ng is missing), to show the suite does not depend on an idle machine.
Meanwhile a thread samples every process's CPU time each ``SAMPLE_S`` seconds and sums it by kind of
process (``kind``: a Ray head's GCS, raylet and agents, Airflow's components, task runners, pytest, the
browser...), so the results say where the machine's CPU went. A process that lives less than one sample
is missed and one that ends loses its last interval: the table is a lower bound, good for proportions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SAMPLE_S = 2.0
# (kind, pattern on "name cmdline"), first match wins; "pytest" includes its xdist lanes (execnet's workers).
# By name first: a Ray worker's command line names the raylet's socket and the agents' ports, so command-line
# patterns alone put workers in the wrong rows.
KINDS = [
    ("ray gcs_server", r"^gcs_server "), ("ray raylet", r"^raylet "),
    ("ray daemons (dashboard, agents, log and autoscaler monitors)",
     r"^ray::(DashboardAgent|RuntimeEnvAgent)|dashboard/dashboard\.py|dashboard/agent\.py|runtime_env/agent|"
     r"log_monitor\.py|autoscaler/_private/monitor\.py"),
    ("ray Client server", r"ray\.util\.client\.server|ray_client_server"),
    ("ray start / stop (cli)", r"bin/ray (start|stop)"),
    ("ray worker processes (tasks, actors, owners)", r"^ray::|default_worker\.py"),
    ("airflow task runners", r"airflow worker --|airflow task|supervis"),
    ("airflow scheduler", r"airflow scheduler"), ("airflow dag-processor", r"dag-processor|dag_processor"),
    ("airflow api-server", r"api-server|api_server|uvicorn|gunicorn"), ("airflow triggerer", r"triggerer"),
    ("celery", r"celery"), ("airflow CLI (db migrate, dags test)", r"-m airflow|bin/airflow"),
    ("pytest", r"pytest|exec\(eval\(sys\.stdin\.readline"), ("chromium", r"chrom"), ("seaweedfs", r"weed"),
    ("postgres", r"postgres"),
    ("stress", r"stress-ng|_busy"), ("uv / pip", r"\buv\b|pip"), ("other python", r"python"),
]


# Which tier is running, from the pytest command lines the Makefile uses. The smoke, unit and part of the system
# tier run beside the integration tier: a sample taken while it runs counts as the integration tier's (the phase).
TIERS = [("integration", "tests/integration"), ("system", "tests/system"), ("unit", "tests/unit"),
         ("smoke", "-m smoke")]


def tier_of(cmdline: str) -> str | None:
    if "pytest" not in cmdline:
        return None
    return next((tier for tier, marker in TIERS if marker in cmdline), None)


def kind(proc: psutil.Process) -> str:
    text = f"{proc.name()} {' '.join(proc.cmdline())}"
    return next((k for k, pattern in KINDS if re.search(pattern, text)), "other")


class CpuSampler(threading.Thread):
    """CPU seconds used by kind of process, sampled every ``SAMPLE_S`` (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="cpu-sampler")
        self.used: Counter[str] = Counter()
        self.by_tier: dict[str, Counter[str]] = {}  # the same, split by the tier running at the sample
        self.loads: list[float] = []  # the 1-minute load average at each sample
        self.stop = threading.Event()
        self._last: dict[tuple[int, float], tuple[str, float]] = {}

    def run(self) -> None:
        self._sample(count=False)  # what ran before the suite started is not the suite's
        while not self.stop.wait(SAMPLE_S):
            self._sample(count=True)
            self.loads.append(os.getloadavg()[0])

    def _sample(self, count: bool) -> None:
        seen: dict[tuple[int, float], tuple[str, float]] = {}
        running: set[str] = set()
        for proc in psutil.process_iter():
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
                total = times.user + times.system
                what = self._last[key][0] if key in self._last else kind(proc)
                if what == "pytest" and (found := tier_of(" ".join(proc.cmdline()))):
                    running.add(found)
            except psutil.Error:
                continue
            seen[key] = (what, total)
        tier = next((name for name, _ in TIERS if name in running), "between tiers")
        if count:
            used = self.by_tier.setdefault(tier, Counter())
            for key, (what, total) in seen.items():
                delta = max(0.0, total - self._last.get(key, (what, 0.0))[1])
                self.used[what] += delta
                used[what] += delta
        self._last = seen


def _busy() -> None:
    while True:
        pass


def start_load(cores: int) -> list:
    """``cores`` busy processes: stress-ng where installed, Python loops otherwise."""
    if not cores:
        return []
    if shutil.which("stress-ng"):
        return [subprocess.Popen(["stress-ng", "--cpu", str(cores), "--quiet"], start_new_session=True)]
    procs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(cores)]
    for proc in procs:
        proc.start()
    return procs


def stop_load(procs: list) -> None:
    for proc in procs:
        if isinstance(proc, subprocess.Popen):
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        else:
            proc.terminate()
            proc.join(timeout=30)


def slowest(report: Path, n: int = 25) -> list[tuple[str, float, float]]:
    rows = []
    for line in report.read_text().splitlines() if report.exists() else []:
        nodeid, wall, cpu = line.split("\t")[:3]
        rows.append((nodeid, float(wall), float(cpu)))
    return sorted(rows, key=lambda r: -r[1])[:n]


def lanes(report: Path) -> list[str]:
    """Each tier's lanes (pytest-xdist workers): how long each was busy and its modules in the order it ran
    them, with their wall seconds, from the report's lane and start columns (tests/conftest.py)."""
    runs: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    for line in report.read_text().splitlines() if report.exists() else []:
        fields = line.split("\t")
        if len(fields) != 5 or not fields[3].startswith("gw"):  # the smoke runs are not in lanes
            continue
        nodeid, wall, _, lane, at = fields
        tier = nodeid.split("/")[1] if nodeid.count("/") > 1 else "?"
        runs.setdefault((tier, lane), []).append((float(at), float(wall), nodeid))
    lines = []
    for (tier, lane), tests in sorted(runs.items()):
        tests.sort()
        busy = max(at + wall for at, wall, _ in tests) - tests[0][0]
        modules: list[list] = []  # consecutive tests of one module
        for _, wall, nodeid in tests:
            module = nodeid.split("::")[0].removeprefix(f"tests/{tier}/")
            if modules and modules[-1][0] == module:
                modules[-1][1] += wall
            else:
                modules.append([module, wall])
        lines.append(f"- {tier} {lane}, {busy:.0f} s: " + ", ".join(f"{m} {w:.0f}" for m, w in modules))
    return lines


def load_summary(loads: list[float]) -> dict[str, float]:
    """The median, 90th percentile and maximum of the sampled load averages."""
    if not loads:
        return {}
    ranked = sorted(loads)
    return {"median": round(ranked[len(ranked) // 2], 1), "p90": round(ranked[int(len(ranked) * 0.9)], 1),
            "max": round(ranked[-1], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, required=True, help="where to clone (must not exist)")
    parser.add_argument("--stress", type=int, default=0, metavar="N", help="keep N cores busy meanwhile")
    parser.add_argument("--label", default=None, help="the run's name in the results (default: idle/loaded)")
    args = parser.parse_args()
    label = args.label or (f"stress-ng --cpu {args.stress}" if args.stress else "idle machine")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(args.dest)], check=True)
    report = args.dest / "cpu-per-test.tsv"
    log = args.dest / "make-test.log"
    load = start_load(args.stress)
    sampler = CpuSampler()
    sampler.start()
    started = time.monotonic()
    try:
        with open(log, "w") as out:
            status = subprocess.run(["make", "test"], cwd=args.dest, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "AIRFLOW_RAY_TEST_CPU_REPORT": str(report)}).returncode
    finally:
        stop_load(load)
        sampler.stop.set()
    wall = time.monotonic() - started
    times = (args.dest / ".test-times").read_text().strip() if (args.dest / ".test-times").exists() else ""
    summary = [line for line in log.read_text(errors="replace").splitlines()
               if line.startswith("=") and (" passed" in line or " failed" in line or " error" in line)]
    result = {"commit": commit, "label": label, "status": status, "wall_s": round(wall),
              "tiers": times.splitlines(), "pytest": summary,
              "cpu_s_by_kind": {k: round(v) for k, v in sampler.used.most_common()},
              "load_average": load_summary(sampler.loads),
              "cpu_s_by_tier": {t: {k: round(v) for k, v in c.most_common()} for t, c in sampler.by_tier.items()},
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "suite_tiers.jsonl", "a") as out:
        out.write(json.dumps(result) + "\n")
    lines = [f"\n## {label}: commit {commit}, {result['at']}\n",
             f"`python benchmarks/suite_tiers.py --dest {args.dest}"
             + (f" --stress {args.stress}`" if args.stress else "`"),
             f"\n\n- `make test` exit status {status}, wall {wall:.0f} s ({wall / 60:.1f} min)",
             "- 1-minute load average over the run: "
             + ", ".join(f"{k} {v}" for k, v in result["load_average"].items()),
             *(f"- {line}" for line in times.splitlines()),
             *(f"- pytest: `{line.strip('= ')}`" for line in summary),
             "\nLanes (each lane's busy time from its first test's start to its last test's end; its modules in the "
             "order it ran them, wall s):\n", *lanes(report),
             "\nSlowest tests (wall s, machine busy CPU-s during the test; lanes overlap, so CPU is shared):\n",
             "| test | wall s | CPU-s |", "| --- | --- | --- |",
             *(f"| `{nodeid}` | {w:.0f} | {c:.0f} |" for nodeid, w, c in slowest(report)),
             f"\nCPU seconds by kind of process (sampled every {SAMPLE_S:.0f} s; a lower bound), "
             f"{sum(sampler.used.values()):.0f} in all against {2 * wall:.0f} core-seconds of wall:\n",
             "| kind | CPU-s | share |", "| --- | --- | --- |",
             *(f"| {k} | {v:.0f} | {v / max(1.0, sum(sampler.used.values())):.0%} |"
               for k, v in sampler.used.most_common()),
             "\nThe same by tier (CPU-s; the kinds that took 5% of the tier or more):\n",
             *(f"- {t} ({sum(c.values()):.0f} CPU-s): " + ", ".join(
                 f"{k} {v:.0f}" for k, v in c.most_common() if v >= 0.05 * sum(c.values()))
               for t, c in sampler.by_tier.items()), ""]
    with open(RESULTS / "suite_tiers.md", "a") as out:
        out.write("\n".join(lines))
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
