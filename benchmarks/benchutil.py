"""Helpers shared by the benchmark scripts: running subprocesses, medians, what machine and code ran."""

from __future__ import annotations

import os
import platform
import shlex
import signal
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd: list[str], env: dict[str, str], timeout: float, log: Path | None = None) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; kill that group on timeout. Output goes to ``log`` if given."""
    out = open(log, "w") if log else subprocess.PIPE
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from None
    finally:
        if log:
            out.close()
    return proc.returncode, log.read_text() if log else stdout


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def provider_commit() -> str:
    """The last commit touching ``src/``, and whether ``src/`` has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", "src"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in src/' if dirty else ''}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def publish(report: str, out: Path) -> None:
    """Print a finished Markdown report and write it to ``out`` (under ``benchmarks/results/``)."""
    print("\n" + report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}")
