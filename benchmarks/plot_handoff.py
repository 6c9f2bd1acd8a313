"""Draw handoff time against payload size from ``xcom_handoff.py`` reports (their "Against raw Ray" table).

    python benchmarks/plot_handoff.py benchmarks/results/xcom_handoff-256mib.md benchmarks/results/xcom_handoff-1gib.md

Writes ``benchmarks/results/xcom_handoff.png``: the provider's handoff and raw Ray's, per payload kind, against
size in MiB (a DataFrame's size is its rows x 24 bytes: int64 ``id``, float64 ``x`` and ``y``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROW = re.compile(r"^\| (array (\d+) MiB|frame ([\d,]+) rows) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \| "
                 r"([+-][\d.]+) \|")
TINY = re.compile(r"^\| tiny \(baseline\) \| ([\d.]+) \| ([\d.]+) \|")
OUT = Path(__file__).resolve().parent / "results" / "xcom_handoff.png"


def points(paths: list[Path]) -> dict[str, list[tuple[float, float, float]]]:
    """kind -> [(MiB, raw handoff s, provider handoff s)], sorted by size."""
    found: dict[str, list[tuple[float, float, float]]] = {"array": [], "frame": [], "tiny": []}
    for path in paths:
        for line in path.read_text().splitlines():
            if t := TINY.match(line):
                found["tiny"].append((0.0, float(t[1]), float(t[2])))
            m = ROW.match(line)
            if not m:
                continue
            if m[2]:
                found["array"].append((float(m[2]), float(m[4]), float(m[5])))
            else:
                found["frame"].append((int(m[3].replace(",", "")) * 24 / 2**20, float(m[4]), float(m[5])))
    return {k: sorted(v) for k, v in found.items() if v}


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = points([Path(p) for p in sys.argv[1:]])
    if not data:
        print("no 'Against raw Ray' rows in the given reports", file=sys.stderr)
        return 1
    fig, axis = plt.subplots(figsize=(6, 4))
    tiny = data.pop("tiny", [])
    if tiny:
        fixed = sum(r[2] for r in tiny) / len(tiny)
        axis.axhline(fixed, color="grey", linestyle=":", label=f"@task.ray, a 3-float list ({fixed:.2f} s)")
    for kind, rows in data.items():
        sizes = [r[0] for r in rows]
        axis.plot(sizes, [r[2] for r in rows], "o-", label=f"{kind}: @task.ray + Ray XCom backend")
        axis.plot(sizes, [r[1] for r in rows], "s--", label=f"{kind}: raw Ray tasks, one driver")
    axis.set(xlabel="payload (MiB)", ylabel="handoff (s): both tasks minus their compute", xscale="log",
             title="Handing a value to the next task")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT, dpi=100)
    print(f"written to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
