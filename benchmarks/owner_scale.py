"""The owner actor at scale: 10,000 held results and 1,000 runs in flight, against raw ``f.remote()``.

    python benchmarks/owner_scale.py [--held 10000] [--inflight 1000] [--cpus 2]

No Airflow: one driver process (the physical limit for Ray) on an embedded head with ``--cpus`` CPUs.

1. *Held*: one run through the provider's ``RayTaskRun`` (owner shard 0) returns a list of ``--held`` items,
   which the owner splits into one held object per item (as for a task mapped over them); it keeps every
   one, as it does for XComs of finished DAG runs. Then the owner actor's idle CPU
   use over 10 s and its RSS (the process titled ``ray::TaskOwner``).
2. *In flight*: ``--inflight`` runs of a body that notes when it started and sleeps 0.2 s, submitted at once
   through ``RayTaskRun`` (with the held results still there), against the same body as raw ``f.remote()``.
   Submit-to-start latency per task (the body's start minus its submit time), the time until all have
   finished, and the owner's CPU during the phase. Raw first, then the provider, then raw again.

Writes ``benchmarks/results/owner_scale.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.benchutil import ROOT, cpu_model, provider_commit, publish

RESULTS = ROOT / "benchmarks" / "results"


def _owner_process() -> Any:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any("TaskOwner" in part for part in proc.info["cmdline"] or []):
            return proc
    raise RuntimeError("no ray::TaskOwner process found")


def _cpu(proc: Any) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _body(_: int) -> float:
    import time

    started = time.time()
    time.sleep(0.2)
    return started


def _pcts(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"p50": round(values[len(values) // 2], 3), "p95": round(values[int(len(values) * 0.95)], 3),
            "max": round(values[-1], 3)}


def raw_phase(n: int) -> dict[str, Any]:
    import ray

    body = ray.remote(num_cpus=1)(_body)
    t0 = time.perf_counter()
    submits, refs = [], []
    for i in range(n):
        submits.append(time.time())
        refs.append(body.remote(i))
    starts = ray.get(refs)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "submit_to_start_s": _pcts([s - q for s, q in zip(starts, submits, strict=True)])}


def provider_phase(n: int, tag: str, owner: Any) -> dict[str, Any]:
    from airflow_ray_provider.submission import RayTaskRun

    log = logging.getLogger("owner_scale")
    cpu0 = _cpu(owner)
    t0 = time.perf_counter()
    runs, submits = [], []
    for i in range(n):
        run = RayTaskRun(key=f"scale/{tag}/{i}", task_label=f"{tag}[{i}]", namespace="bench", shards=1, lease_s=600,
                         log=log)
        submits.append(time.time())
        run.submit(_body, (i,), {}, {"name": f"{tag}[{i}]", "num_cpus": 1})
        runs.append(run)
    submitted = time.perf_counter() - t0
    starts = []
    for run in runs:
        run.wait()
        starts.append(run.fetch())
    wall = time.perf_counter() - t0
    cpu = _cpu(owner) - cpu0
    for run in runs:
        run.release()
    return {"wall_s": round(wall, 2), "submit_all_s": round(submitted, 2), "owner_cpu_s": round(cpu, 2),
            "submit_to_start_s": _pcts([s - q for s, q in zip(starts, submits, strict=True)])}


def hold(n: int) -> dict[str, Any]:
    """``n`` held results, the way a mapped task over ``n`` items leaves them: one run returns a list of ``n``
    items and the owner splits it into one object per item (keys ``held#0`` ... ``held#{n-1}``)."""
    import ray

    from airflow_ray_provider.cluster.owner import get_owner
    from airflow_ray_provider.submission import RayTaskRun

    t0 = time.perf_counter()
    run = RayTaskRun(key="held", task_label="held", namespace="bench", shards=1, lease_s=600,
                     log=logging.getLogger("owner_scale"))
    run.submit(_items, (n,), {}, {"name": "held"})
    run.wait()
    items = ray.get(get_owner("bench", 0).split.remote("held", None), timeout=600)
    if len(items) != n:
        raise RuntimeError(f"the owner split {len(items)} items, expected {n}")
    owner = _owner_process()
    time.sleep(2)
    cpu0 = _cpu(owner)
    time.sleep(10)
    return {"held": n, "fill_s": round(time.perf_counter() - t0, 1), "owner": owner,
            "idle_owner_cpu_pct": round((_cpu(owner) - cpu0) / 10 * 100, 1),
            "owner_rss_mb": round(owner.memory_info().rss / 2**20, 1)}


def _items(n: int) -> list[int]:
    return list(range(n))


def _plus_one(x: int) -> int:
    return x + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--held", type=int, default=10_000)
    parser.add_argument("--inflight", type=int, default=1_000)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from airflow_ray_provider.local_cluster import LocalRayCluster, keep_loopback_addresses

    (ROOT / "benchmarks" / ".work").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="owner-scale-", dir=ROOT / "benchmarks" / ".work"))
    cluster = LocalRayCluster(work / "ray", num_cpus=args.cpus)
    state = cluster.ensure_running()
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.auth_token() or "")
    keep_loopback_addresses()
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this script
    result: dict[str, Any] = {"args": vars(args), "commit": provider_commit(), "cpu": cpu_model(),
                              "date": dt.date.today().isoformat()}
    try:
        ray.init(address=state.address, namespace="bench", log_to_driver=False, configure_logging=False)
        ray.get([ray.remote(_plus_one).remote(i) for i in range(args.cpus)])  # warm workers
        held = hold(args.held)
        owner = held.pop("owner")
        result["held"] = held
        print("held:", held, flush=True)
        result["raw_1"] = raw_phase(args.inflight)
        print("raw:", result["raw_1"], flush=True)
        result["provider"] = provider_phase(args.inflight, "inflight", owner)
        print("provider:", result["provider"], flush=True)
        result["raw_2"] = raw_phase(args.inflight)
        print("raw:", result["raw_2"], flush=True)
        result["owner_rss_after_mb"] = round(owner.memory_info().rss / 2**20, 1)
    finally:
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    (RESULTS / "owner_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    raw_p50 = statistics.median([result[k]["submit_to_start_s"]["p50"] for k in ("raw_1", "raw_2")])
    raw_wall = statistics.median([result["raw_1"]["wall_s"], result["raw_2"]["wall_s"]])
    prov = result["provider"]
    lines = [f"# owner_scale ({result['date']}, {result['cpu']}, provider {result['commit']})", "",
             f"`python benchmarks/owner_scale.py --held {args.held} --inflight {args.inflight} --cpus {args.cpus}`; "
             "one driver, embedded head. Submit-to-start: the body's first line minus its submit time; with "
             f"{args.cpus} CPUs and {args.inflight} bodies of 0.2 s at once, most of it is queueing, the same for "
             "both.",
             "", f"Owner actor holding {held['held']} finished results (filled in {held['fill_s']} s): idle CPU "
             f"**{held['idle_owner_cpu_pct']}%** of one core, RSS **{held['owner_rss_mb']} MB** "
             f"({result['owner_rss_after_mb']} MB after the in-flight phase).", "",
             "| phase | all finished (s) | submit-to-start p50 / p95 / max (s) | owner CPU (s) |", "|---|---|---|---|"]
    for name, key in (("raw `f.remote()` (before)", "raw_1"), ("provider `RayTaskRun`", "provider"),
                      ("raw `f.remote()` (after)", "raw_2")):
        row = result[key]
        s2s = row["submit_to_start_s"]
        lines.append(f"| {name} | {row['wall_s']} | {s2s['p50']} / {s2s['p95']} / {s2s['max']} | "
                     f"{row.get('owner_cpu_s', '-')} |")
    ratio = prov["submit_to_start_s"]["p50"] / raw_p50 if raw_p50 else float("inf")
    lines += ["", f"Provider against raw at {args.inflight} in flight: submit-to-start p50 **{ratio:.2f}x** "
              f"(goal within 2x: {'met' if ratio <= 2 else 'NOT met'}); all finished {prov['wall_s'] / raw_wall:.2f}x. "
              f"Submitting all {args.inflight} took {prov['submit_all_s']} s (one `ray.put` and one owner call each)."]
    publish("\n".join(lines) + "\n", RESULTS / "owner_scale.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
