"""The keeper: a long-lived Ray driver whose job owns the owner actors.

Ray ties a worker process to the job that submitted work to it, and it kills a job's
idle workers as soon as that job's driver exits. An owner actor created by an Airflow
task process belongs to that process's job, which ends within seconds, so every
later ``@task.ray`` task would wait for a fresh Ray worker (about 1.7 s here; see
``benchmarks/results/chain10.md``). The keeper is a driver that does not exit: it
creates a small factory actor, and the owner actors the factory creates belong to
the keeper's job, so warm workers stay warm.

The keeper is started inside the cluster by a detached launcher actor
(``owner.KeeperLauncher``), so the same path serves the embedded head and a remote
cluster, and no Airflow process has to outlive its task.

    python -m airflow_ray_provider.cluster.keeper GCS_ADDRESS

This module runs inside the Ray cluster and must not import Airflow.
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray

from airflow_ray_provider.cluster import owner


def main(argv: list[str]) -> int:
    address = argv[0]
    runtime_env = json.loads(os.environ.get(owner.KEEPER_RUNTIME_ENV) or "{}")
    ray.init(address=address, namespace=owner.SYSTEM_NAMESPACE, log_to_driver=False, configure_logging=False,
             runtime_env=runtime_env or None)
    # Not detached: the factory must die with this driver, so a dead keeper is noticed and replaced.
    factory = ray.remote(owner.OwnerFactory).options(
        name=owner.FACTORY_NAME, namespace=owner.SYSTEM_NAMESPACE, get_if_exists=True, num_cpus=0,
        resources=owner.ON_HEAD_NODE, max_concurrency=64,
    ).remote()
    ray.get(factory.ping.remote())
    print(f"keeper ready: job {ray.get_runtime_context().get_job_id()}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
