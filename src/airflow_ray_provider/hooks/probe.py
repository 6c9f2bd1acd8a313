"""``python -m airflow_ray_provider.hooks.probe ADDRESS NAMESPACE TIMEOUT``: connect once and describe the cluster.

Runs in a throwaway process for ``RayHook.test_connection`` so the API server never becomes a Ray driver.
"""

from __future__ import annotations

import os
import sys

from airflow_ray_provider.exceptions import RayConnectionError
from airflow_ray_provider.hooks.ray import _connect_bounded
from airflow_ray_provider.hooks.settings import RaySettings, parse_address


def main(argv: list[str]) -> int:
    address, namespace, timeout = argv[0], argv[1], float(argv[2])
    # The token comes through the environment (never argv, which ``ps`` shows); the settings must carry
    # it too, so a refusal is reported as a refused token rather than a missing one.
    settings = RaySettings(address=parse_address(address), namespace=namespace, connect_timeout=timeout,
                           auth_token=os.environ.get("RAY_AUTH_TOKEN") or None)
    try:
        _connect_bounded(address, settings)
    except RayConnectionError as exc:
        print(exc)
        return 1
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    resources = ray.cluster_resources()
    print(f"Connected to Ray {ray.__version__} at {address}: {len(nodes)} node(s), "
          f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
