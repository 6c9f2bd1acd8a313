"""Two Ray nodes: data made on one node is used on the other, and a checkpointed result outlives its node.

Written for docker-compose.yaml's cluster, whose nodes carry the custom resources ``head_node`` and
``worker_node`` (a tiny share of one pins a task to that node). On a cluster without those
resources the tasks fail at once, naming the missing resource.

- ``produce_shared`` runs on the worker node; ``consume_on_head`` gets its array on the head node.
  Ray moves the object between the nodes' object stores; Airflow only ever holds a reference.
- ``produce_kept`` runs on the worker node with ``checkpoint=True``. With ``wait_for_node_loss`` on,
  ``wait_for_node_loss`` waits until the worker node is gone (``docker compose kill ray-worker``),
  and ``consume_kept`` then gets the array back from its checkpoint. ``ray_max_retries=0``: Ray
  does not try to recompute a task pinned to a node that no longer exists.
"""

from __future__ import annotations

import time
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

WORKER, HEAD = {"worker_node": 0.001}, {"head_node": 0.001}


def array_of(mb: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).random(mb * 1024 * 1024 // 8)


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["ray", "example", "multi-node"],
    params={
        "mb": Param(32, type="integer", minimum=1),
        "wait_for_node_loss": Param(False, type="boolean",
                                    description="wait for the worker node to die before consume_kept runs"),
        "node_loss_timeout": Param(600, type="integer", minimum=1),
    },
)
def example_ray_two_nodes():
    @task.ray(resources=WORKER, multiple_outputs=True)
    def produce_shared(params: dict) -> dict:
        import ray

        return {"array": array_of(params["mb"], seed=1), "node": ray.get_runtime_context().get_node_id()}

    @task.ray(resources=HEAD)
    def consume_on_head(array: Any, produced_on: str) -> dict:
        import ray

        return {"produced_on": produced_on, "consumed_on": ray.get_runtime_context().get_node_id(),
                "sum": float(array.sum())}

    @task.ray(resources=WORKER, checkpoint=True, ray_max_retries=0)
    def produce_kept(params: dict) -> Any:
        return array_of(params["mb"], seed=2)

    @task
    def wait_for_node_loss(params: dict) -> str:
        """Blocks until no live node offers ``worker_node`` (only when asked to)."""
        if not params["wait_for_node_loss"]:
            return "not waiting"
        import ray

        from airflow_ray_provider.hooks.ray import RayHook

        RayHook().get_conn()
        started = time.monotonic()
        print("waiting for the worker node to go away")
        while any(n["Alive"] and "worker_node" in n["Resources"] for n in ray.nodes()):
            if time.monotonic() - started > params["node_loss_timeout"]:
                raise TimeoutError(f"the worker node was still alive after {params['node_loss_timeout']}s")
            time.sleep(1)
        return f"worker node gone after {time.monotonic() - started:.0f}s"

    @task.ray(resources=HEAD)
    def consume_kept(array: Any) -> dict:
        import ray

        return {"consumed_on": ray.get_runtime_context().get_node_id(), "sum": float(array.sum())}

    @task
    def report(shared: dict, kept: dict, waited: str, params: dict) -> dict:
        expected = {"shared": float(array_of(params["mb"], seed=1).sum()),
                    "kept": float(array_of(params["mb"], seed=2).sum())}
        result = {**shared, "kept_consumed_on": kept["consumed_on"], "kept_sum": kept["sum"], "waited": waited,
                  "equal": shared["sum"] == expected["shared"] and kept["sum"] == expected["kept"]}
        print(result)
        return result

    shared = produce_shared()
    on_head = consume_on_head(shared["array"], shared["node"])
    kept = produce_kept()
    waited = wait_for_node_loss()
    [on_head, kept] >> waited
    later = consume_kept(kept)
    waited >> later
    report(on_head, later, waited)


example_ray_two_nodes()
