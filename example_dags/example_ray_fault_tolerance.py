"""Fault tolerance: a checkpointed result outlives the Ray cluster, and a failed task is retried.

``produce`` builds a frame on Ray and checkpoints it (``checkpoint=True``). ``restart_ray``
then restarts the embedded Ray head, which loses every object in it, as a node or cluster
failure would. ``transform`` fails on its first try (a stand-in for a preempted worker or a
flaky service); its retry finds its input gone from Ray, restores it from the checkpoint
into the new cluster and goes on, without running ``produce`` again. ``verify`` checks that
the recovered data equal the original, row for row.

Only the embedded cluster is restarted; with a ``ray_default`` connection to a real cluster
``restart_ray`` leaves it alone and says so.
"""

from __future__ import annotations

import datetime
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task


def fingerprint(frame: Any) -> str:
    """A digest of a frame's values, index and column names, to compare data across clusters."""
    import hashlib

    import pandas as pd

    digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    digest.update(repr(list(frame.columns)).encode())
    return digest.hexdigest()


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["ray", "example", "checkpoint"],
    params={
        "rows": Param(200_000, type="integer", minimum=1),
        "restart_cluster": Param(True, type="boolean", description="restart the embedded Ray head mid-run"),
        "fail_first_try": Param(True, type="boolean", description="make transform fail once"),
    },
)
def example_ray_fault_tolerance():
    @task.ray(checkpoint=True, multiple_outputs=True)
    def produce(params: dict) -> dict:
        """The expensive upstream: its result is written to the checkpoint store before it is handed on."""
        import numpy as np
        import pandas as pd

        rng = np.random.default_rng(42)
        rows = params["rows"]
        frame = pd.DataFrame({
            "sensor": rng.integers(0, 100, size=rows),
            "reading": rng.normal(20.0, 5.0, size=rows),
            "ok": rng.random(rows) > 0.01,
        })
        return {"frame": frame, "fingerprint": fingerprint(frame)}

    @task
    def restart_ray(params: dict) -> str:
        """Lose the whole Ray cluster: stop the embedded head and start a new one (a new port, an empty store)."""
        import ray

        from airflow_ray_provider.hooks.ray import RayHook
        from airflow_ray_provider.hooks.settings import LOCAL
        from airflow_ray_provider.local_cluster import LocalRayCluster

        if not params["restart_cluster"]:
            return "not restarted (restart_cluster is off)"
        if RayHook().settings.address.kind != LOCAL:
            return "not restarted: ray_default points at a cluster this DAG does not own"
        cluster = LocalRayCluster()
        before = cluster.status()
        ray.shutdown()
        cluster.stop()
        after = cluster.ensure_running()
        line = f"Ray head restarted: {before.address if before else 'not running'} -> {after.address}"
        print(line)
        return line

    @task.ray(retries=1, retry_delay=datetime.timedelta(seconds=0))
    def transform(frame: Any, params: dict, try_number: str) -> dict:
        """Fails once on purpose; the retry gets the upstream frame back from its checkpoint."""
        if params["fail_first_try"] and try_number == "1":
            raise RuntimeError("simulated transient failure on the first try")
        per_sensor = frame[frame["ok"]].groupby("sensor")["reading"].mean()
        return {"fingerprint": fingerprint(frame), "rows": len(frame), "sensors": len(per_sensor),
                "mean_of_means": float(per_sensor.mean()), "try": int(try_number)}

    @task
    def verify(original: str, recovered: dict) -> str:
        if recovered["fingerprint"] != original:
            raise ValueError(f"recovered data differ from the original: {recovered['fingerprint']} != {original}")
        line = (f"recovered {recovered['rows']} rows equal to the original on try {recovered['try']}; "
                f"{recovered['sensors']} sensors, mean reading {recovered['mean_of_means']:.3f}")
        print(line)
        return line

    produced = produce()
    restarted = restart_ray()
    transformed = transform(produced["frame"], try_number="{{ ti.try_number }}")
    produced["fingerprint"] >> restarted >> transformed
    verify(produced["fingerprint"], transformed)


example_ray_fault_tolerance()
