"""``python -m airflow_ray_provider.ui.inspect``: ask the owner actors about a DAG run's objects, or release them.

Runs in a throwaway process, one per ``ray`` connection, for the Ray view (:mod:`.app`), so the API
server never becomes a Ray driver (a driver dies with its cluster, see ``RayHook.get_conn``). It
reads an :class:`InspectRequest` as JSON on stdin and prints one ``RESULT {json}`` line
(:class:`InspectReport`). It never fetches an object: only the owners' inventories and the
object store's use.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Held:
    """What an owner actor says about one key it holds."""

    state: str
    finished_at: float | None
    size: int | None


@dataclass
class InspectReport:
    """Which of the asked keys each owner holds, the cluster's object store use, or why nothing is known."""

    held: dict[str, dict[str, Any]] = field(default_factory=dict)  # "namespace/shard/key" -> Held
    released: int = 0
    store_used_bytes: int | None = None
    store_capacity_bytes: int | None = None
    error: str | None = None


def held_id(namespace: str, shard: int, key: str) -> str:
    return f"{namespace}/{shard}/{key}"


def inspect(conn_id: str, objects: list[dict[str, Any]], release: bool) -> InspectReport:
    from airflow_ray_provider.hooks.ray import RayHook
    from airflow_ray_provider.hooks.settings import LOCAL
    from airflow_ray_provider.local_cluster import LocalRayCluster

    hook = RayHook(conn_id)
    through_gateway = hook.settings.gateway_url is not None
    if not through_gateway and hook.settings.address.kind == LOCAL and LocalRayCluster().status() is None:
        # Asking must not start a cluster: nothing is held in one that is not running.
        return InspectReport(error="the embedded Ray head is not running")
    owners = hook.owners()
    report = InspectReport()
    by_owner: dict[tuple[str, int], list[str]] = {}
    for obj in objects:
        by_owner.setdefault((str(obj["namespace"]), int(obj["owner"])), []).append(str(obj["key"]))
    for (namespace, shard), keys in by_owner.items():
        inventory = owners.inventory(namespace, shard)
        for key in keys:
            if key in inventory:
                row = inventory[key]
                report.held[held_id(namespace, shard, key)] = asdict(
                    Held(str(row["state"]), row.get("finished_at"), row.get("size")))
        if release:
            report.released += owners.release([k for k in keys if k in inventory], namespace, shard)
    if not through_gateway:  # the store's use comes from `ray memory` on a driver; the gateway does not say yet
        import ray

        from airflow_ray_provider.cluster import ray_compat

        use = ray_compat.object_store_use(ray.get_runtime_context().gcs_address)
        if use is not None:
            report.store_used_bytes, report.store_capacity_bytes = use
    return report


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        report = inspect(str(request["conn_id"]), list(request["objects"]), bool(request.get("release")))
    except Exception as exc:  # noqa: BLE001 - reported to the page, which shows why it knows nothing
        report = InspectReport(error=f"{type(exc).__name__}: {exc}")
    print("RESULT " + json.dumps(asdict(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
