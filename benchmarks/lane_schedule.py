"""How a tier's modules are shared among its lanes, replayed from a run's test times; and how far from ideal it is.

    python benchmarks/lane_schedule.py /work/run15/cpu-per-test.tsv system
    python benchmarks/lane_schedule.py /work/run15/cpu-per-test.tsv integration

The report is ``suite_tiers.py``'s ``cpu-per-test.tsv`` of a run (test, wall s, CPU-s, lane, start). The replay
follows pytest-xdist 3.8's ``LoadScopeScheduling`` as the Makefile runs it (``--dist loadfile
--no-loadscope-reorder``): modules in the order ``tests/support/lanes.py`` gives them, one to each lane, then
another to every lane with two or fewer tests left, and so again after each test. It prints the replayed lanes
(to compare with the run's own), the ideal (every lane equally busy), and the best module order a search finds,
scored on the run's times each scaled by up to +-25% per module (30 draws), so that it does not fit one run.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import itertools
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Modules = dict[str, list[float]]  # module path (relative to the tier) -> its tests' wall seconds, in run order


def read_report(path: Path, tier: str) -> Modules:
    """The tier's modules and their tests' wall times, from the lanes' rows (not the smoke runs')."""
    rows = []
    for line in path.read_text().splitlines():
        nodeid, wall, _cpu, lane, at = line.split("\t")
        if nodeid.startswith(f"tests/{tier}/") and lane.startswith("gw"):
            rows.append((float(at), nodeid, float(wall)))
    modules: Modules = {}
    for _, nodeid, wall in sorted(rows):
        modules.setdefault(nodeid.split("::")[0].removeprefix(f"tests/{tier}/"), []).append(wall)
    return modules


def replay(order: list[str], modules: Modules, lanes: int) -> tuple[float, list[float], list[list[str]]]:
    """The tier's wall time, each lane's end and its modules, for modules handed out in ``order``."""
    queue = collections.deque(order)
    pending: list[collections.deque[float]] = [collections.deque() for _ in range(lanes)]
    taken: list[list[str]] = [[] for _ in range(lanes)]

    def hand_out(lane: int) -> None:
        if queue:
            module = queue.popleft()
            taken[lane].append(module)
            pending[lane].extend(modules[module])

    def top_up(lane: int) -> None:  # LoadScopeScheduling._reschedule: two or fewer tests left
        if len(pending[lane]) <= 2:
            hand_out(lane)

    for lane in range(lanes):
        hand_out(lane)
    for lane in range(lanes):
        top_up(lane)
    ends = [0.0] * lanes
    events = [(pending[lane][0], lane) for lane in range(lanes) if pending[lane]]
    heapq.heapify(events)
    while events:
        now, lane = heapq.heappop(events)
        pending[lane].popleft()
        ends[lane] = now
        top_up(lane)
        if pending[lane]:
            heapq.heappush(events, (now + pending[lane][0], lane))
    return max(ends), ends, taken


def perturbed(modules: Modules, seed: int = 0, draws: int = 30) -> list[Modules]:
    """The run's times with each module's scaled by a factor drawn from 0.75-1.25, ``draws`` times."""
    rng = random.Random(seed)
    return [{m: [w * f for w in ws] for m, ws in modules.items() for f in [rng.uniform(0.75, 1.25)]}
            for _ in range(draws)]


def mean_wall(order: list[str], draws: list[Modules], lanes: int) -> float:
    return sum(replay(order, d, lanes)[0] for d in draws) / len(draws)


def best_order(draws: list[Modules], start: list[str], lanes: int, seed: int = 0) -> tuple[list[str], float]:
    """The order with the shortest mean wall time over ``draws``: random orders, then pairwise swaps."""
    rng = random.Random(seed)
    best, best_mean = start, mean_wall(start, draws, lanes)
    for _ in range(1500):
        order = start[:]
        rng.shuffle(order)
        if (m := mean_wall(order, draws, lanes)) < best_mean:
            best, best_mean = order, m
    improved = True
    while improved:
        improved = False
        for i, j in itertools.combinations(range(len(best)), 2):
            order = best[:]
            order[i], order[j] = order[j], order[i]
            if (m := mean_wall(order, draws, lanes)) < best_mean - 0.5:
                best, best_mean, improved = order, m, True
    return best, best_mean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a run's cpu-per-test.tsv (benchmarks/suite_tiers.py)")
    parser.add_argument("tier", choices=["integration", "system"])
    parser.add_argument("--lanes", type=int, default=3)
    args = parser.parse_args()
    if args.tier == "system":
        from tests.system.conftest import LANE_ORDER
    else:
        from tests.integration.conftest import LANE_ORDER
    modules = read_report(args.report, args.tier)
    today = [m for m in LANE_ORDER if m in modules] + sorted(m for m in modules if m not in LANE_ORDER)
    wall, ends, taken = replay(today, modules, args.lanes)
    total, largest = sum(map(sum, modules.values())), max(map(sum, modules.values()))
    print(f"{args.tier}: {len(modules)} modules, {total:.0f} lane-s; ideal {total / args.lanes:.0f} s (largest "
          f"module {largest:.0f})")
    print(f"today's order (tests/{args.tier}/conftest.py), replayed: {wall:.0f} s")
    for lane, (end, names) in enumerate(zip(ends, taken, strict=True)):
        print(f"  gw{lane} {end:.0f} s: " + ", ".join(f"{m} {sum(modules[m]):.0f}" for m in names))
    draws = perturbed(modules)
    order, mean = best_order(draws, today, args.lanes)
    print(f"best order found: {replay(order, modules, args.lanes)[0]:.0f} s on these times; over perturbed times "
          f"{mean:.0f} s mean against today's {mean_wall(today, draws, args.lanes):.0f}")
    print("  " + ", ".join(order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
