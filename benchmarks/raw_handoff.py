"""The raw Ray baseline for ``xcom_handoff.py``: the same producer and consumer as plain Ray tasks, one driver.

    python benchmarks/raw_handoff.py ADDRESS KIND SIZE [--repeats N]

Runs ``make_payload`` and ``use_payload`` from ``benchmarks/dags/xcom_handoff_dag.py`` (the functions the
DAG's ``@task.ray`` tasks call) as ``f.remote()`` then ``g.remote(ref)``, on the head at ADDRESS (its token
in ``RAY_AUTH_TOKEN``), and prints one ``RAW_HANDOFF {json}`` line per repeat: each task's latency from
submit to its result being ready (the producer's result stays in the object store, as with the Ray XCom
backend) and the compute each task timed itself, so that ``handoff = (producer - compute) + (consumer -
compute)`` is measured the same way as the provider's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "dags"))
sys.path.insert(1, str(HERE.parent))

MARKER = "RAW_HANDOFF"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("address")
    parser.add_argument("kind", choices=("tiny", "array", "frame"))
    parser.add_argument("size", type=int)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from airflow_ray_provider.local_cluster import keep_loopback_addresses

    keep_loopback_addresses()
    import ray
    import xcom_handoff_dag as dag_module
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(dag_module)  # the Ray workers cannot import the DAG file

    @ray.remote(num_returns=2)
    def produce(kind: str, size: int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        import numpy  # noqa: F401 - timed as compute, as in the DAG
        import pandas  # noqa: F401

        payload = dag_module.make_payload(kind, size)
        return payload, time.perf_counter() - t0

    @ray.remote
    def consume(kind: str, payload: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        n, total = dag_module.use_payload(kind, payload)
        return {"n": n, "sum": total, "compute_s": time.perf_counter() - t0}

    ray.init(address=args.address, namespace="raw-handoff", log_to_driver=False)
    try:
        ray.get(consume.remote("tiny", [1.0]))  # a warm worker, as the DAG's warm task gives the provider
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            payload, compute = produce.remote(args.kind, args.size)
            ray.wait([payload, compute], num_returns=2, fetch_local=False)
            produced = time.perf_counter() - t0
            produce_compute = ray.get(compute)
            t1 = time.perf_counter()
            result = ray.get(consume.remote(args.kind, payload))
            consumed = time.perf_counter() - t1
            print(f"{MARKER} " + json.dumps({
                "producer_s": produced, "producer_compute_s": produce_compute, "consumer_s": consumed,
                "consumer_compute_s": result["compute_s"], "n": result["n"],
                "handoff_s": (produced - produce_compute) + (consumed - result["compute_s"])}), flush=True)
            del payload
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
