"""``make test`` on a fresh clone, as CI runs it, timed per tier; optionally with both cores kept busy.

    python benchmarks/suite_tiers.py --dest /work/suite-idle
    python benchmarks/suite_tiers.py --dest /work/suite-loaded --stress 2   # stress-ng --cpu 2 alongside

Clones the committed HEAD (what CI sees) into ``--dest``, runs ``make test`` there, and appends to
``benchmarks/results/suite_tiers.md``: the wall time, the exit status, each tier's wall time (the
``.test-times`` file the Makefile writes) and the slowest tests with the machine's busy CPU seconds
during each (tests/conftest.py, ``AIRFLOW_RAY_TEST_CPU_REPORT``; shared between tests that overlap).
``--stress N`` keeps N cores busy with Debian's ``stress-ng --cpu N`` for the whole run (a Python busy
loop per core where stress-ng is missing), to show the suite does not depend on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


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
        nodeid, wall, cpu = line.rsplit("\t", 2)
        rows.append((nodeid, float(wall), float(cpu)))
    return sorted(rows, key=lambda r: -r[1])[:n]


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
    started = time.monotonic()
    try:
        with open(log, "w") as out:
            status = subprocess.run(["make", "test"], cwd=args.dest, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "AIRFLOW_RAY_TEST_CPU_REPORT": str(report)}).returncode
    finally:
        stop_load(load)
    wall = time.monotonic() - started
    times = (args.dest / ".test-times").read_text().strip() if (args.dest / ".test-times").exists() else ""
    summary = [line for line in log.read_text(errors="replace").splitlines()
               if line.startswith("=") and (" passed" in line or " failed" in line or " error" in line)]
    result = {"commit": commit, "label": label, "status": status, "wall_s": round(wall),
              "tiers": times.splitlines(), "pytest": summary,
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "suite_tiers.jsonl", "a") as out:
        out.write(json.dumps(result) + "\n")
    lines = [f"\n## {label}: commit {commit}, {result['at']}\n",
             f"`python benchmarks/suite_tiers.py --dest {args.dest}"
             + (f" --stress {args.stress}`" if args.stress else "`"),
             f"\n\n- `make test` exit status {status}, wall {wall:.0f} s ({wall / 60:.1f} min)",
             *(f"- {line}" for line in times.splitlines()),
             *(f"- pytest: `{line.strip('= ')}`" for line in summary),
             "\nSlowest tests (wall s, machine busy CPU-s during the test; lanes overlap, so CPU is shared):\n",
             "| test | wall s | CPU-s |", "| --- | --- | --- |",
             *(f"| `{nodeid}` | {w:.0f} | {c:.0f} |" for nodeid, w, c in slowest(report)), ""]
    with open(RESULTS / "suite_tiers.md", "a") as out:
        out.write("\n".join(lines))
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
