"""Benchmark DAG ``xcom_handoff``: one ``@task.ray`` hands a payload to the next (see ``xcom_handoff.py``).

Params: ``kind`` is ``tiny`` (a 3-float list, the baseline), ``array`` (a float64 numpy array of
``size`` MiB) or ``frame`` (a pandas DataFrame of ``size`` rows: int64 ``id``, float64 ``x`` and
``y``). ``warm`` runs first and does nothing but import numpy and pandas: it absorbs the
``airflow dags test`` process's one-time costs (Airflow's in-process execution API, the Ray
connect), which would otherwise land in the producer's task-instance duration. ``produce`` builds
the payload and returns it; ``consume`` takes it as its argument and returns a small dict
(element count and sum). Each callable times its own work with
``time.perf_counter`` and prints it on a ``XCOM_BENCH {json}`` line, which the provider copies
into the task log, so the benchmark can subtract it from the task-instance duration. numpy and
pandas are imported inside the callables, which keeps parsing this file cheap.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import Param, dag, task

MARKER = "XCOM_BENCH"
KINDS = ("tiny", "array", "frame")


def make_payload(kind: str, size: int) -> Any:
    """The payload (also run as a plain Ray task by benchmarks/raw_handoff.py, the raw Ray baseline)."""
    import numpy as np
    import pandas as pd

    if kind == "tiny":
        return [1.0, 2.0, 3.0]
    if kind == "array":
        return np.random.default_rng(0).random(size * 2**20 // 8)  # float64: 8 bytes each
    if kind == "frame":
        rng = np.random.default_rng(0)
        return pd.DataFrame({"id": np.arange(size, dtype=np.int64), "x": rng.random(size), "y": rng.random(size)})
    raise ValueError(f"unknown payload kind {kind!r}")


def use_payload(kind: str, payload: Any) -> tuple[int, float]:
    """What the consumer computes: element count and sum (also the raw Ray baseline's consumer)."""
    if kind == "frame":
        return len(payload), float(payload["x"].sum() + payload["y"].sum()) + float(payload["id"].sum())
    if kind == "array":
        return int(payload.size), float(payload.sum())
    return len(payload), float(sum(payload))


def _report(**fields: Any) -> None:
    import json

    print(f"{MARKER} {json.dumps(fields)}", flush=True)


@dag(
    dag_id="xcom_handoff",
    schedule=None,
    start_date=dt.datetime(2025, 1, 1),
    catchup=False,
    tags=["benchmark"],
    params={
        "kind": Param("tiny", enum=list(KINDS), description="payload: tiny, array (MiB) or frame (rows)"),
        "size": Param(0, type="integer", minimum=0, description="MiB for array, rows for frame"),
    },
)
def xcom_handoff() -> None:
    @task.ray
    def warm() -> None:
        import numpy  # noqa: F401 - also warms the Ray worker that the next tasks are likely to get
        import pandas  # noqa: F401

    @task.ray
    def produce(params: dict[str, Any] | None = None) -> Any:
        import time

        kind, size = str(params["kind"]), int(params["size"])
        t0 = time.perf_counter()
        import numpy  # noqa: F401 - timed as compute, for every kind, so warm and cold workers compare alike
        import pandas  # noqa: F401

        payload = make_payload(kind, size)
        compute_s = time.perf_counter() - t0
        nbytes = int(getattr(payload, "nbytes", 0)) if kind == "array" else (
            int(payload.memory_usage(index=False).sum()) if kind == "frame" else 24)
        _report(task="produce", kind=kind, compute_s=compute_s, nbytes=nbytes)
        return payload

    @task.ray(multiple_outputs=False)  # one small XCom, not one per key
    def consume(payload: Any, params: dict[str, Any] | None = None) -> dict[str, Any]:
        import time

        kind = str(params["kind"])
        t0 = time.perf_counter()
        import numpy  # noqa: F401 - as in produce
        import pandas  # noqa: F401
        n, total = use_payload(kind, payload)
        compute_s = time.perf_counter() - t0
        result = {"task": "consume", "kind": kind, "n": n, "sum": total, "compute_s": compute_s,
                  "type": type(payload).__name__}
        _report(**result)
        return result

    payload = produce()
    warm() >> payload
    consume(payload)


xcom_handoff()
