"""Every private or experimental Ray API the provider touches, in one place, each behind a feature check.

Ray's public API does not cover what the provider needs in a few spots (which cluster a driver
joined, the id of whatever answers at an address now, re-reading the auth token, where object
copies live, hooking placement-group and actor creation). Each such use is a function here.
When the installed Ray lacks the API, the function raises :class:`RayFeatureUnavailable`
naming the Ray version and the supported range, instead of an ``AttributeError`` deep in a task
or a hang. ``tests/unit/test_layout.py`` checks that no other module touches these APIs.

Ray is imported inside the functions: the Airflow side imports this module while parsing DAGs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from airflow_ray_provider.exceptions import RayFeatureUnavailable

# The Ray releases CI runs the suite against (README, "Compatibility"). pyproject.toml admits the same range.
SUPPORTED_RAY = ("2.58", "2.59", "2.60")

# Ray's C++ core ends a driver whose GCS stays unreachable this long (default 60 s); read from the
# environment when the core worker starts, unless the cluster's system config sets it (that wins: measured,
# hooks/ray.py outage_limit_warning). An internal config, not a documented setting.
GCS_RECONNECT_TIMEOUT_NAME = "gcs_rpc_server_reconnect_timeout_s"
GCS_RECONNECT_TIMEOUT_ENV = f"RAY_{GCS_RECONNECT_TIMEOUT_NAME}"

# Undocumented: with it, Ray stops rewriting 127.0.0.1 to the machine's address, so a head can stay
# on loopback. Read once at import into ``ray_constants.ENABLE_RAY_CLUSTER``.
LOOPBACK_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# A head's dashboard process and its autoscaler monitor each serve Prometheus metrics of their own, without the
# head's token, on fixed ports (ray/dashboard/consts.py DASHBOARD_METRIC_PORT 44227, autoscaler/_private/
# constants.py AUTOSCALER_METRIC_PORT 44217; Ray 2.58-2.60), whatever RAY_enable_metrics_collection says, and the
# first head on the machine gets them. Seen: a head of the launcher served ray_dashboard_api_requests_* on
# 127.0.0.1:44227 to anyone on the host. Ray has no switch for them; given a port that cannot be bound, each logs
# that its metrics server did not start and goes on (both catch the error).
NO_METRICS_SERVERS_ENV = {"DASHBOARD_METRIC_PORT": "-1", "AUTOSCALER_METRIC_PORT": "-1"}

# The logger of ray.init's own messages (its SIGTERM-handler warning is filtered, see hooks/ray.py).
WORKER_LOGGER = "ray._private.worker"


def ray_version() -> str:
    import ray

    return ray.__version__


def unavailable(what: str, why: str, exc: BaseException | None = None) -> RayFeatureUnavailable:
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return RayFeatureUnavailable(
        f"airflow-ray-provider needs {what} ({why}), which Ray {ray_version()} does not offer{detail}. "
        f"Supported Ray versions: {', '.join(SUPPORTED_RAY)}; install one of them in Airflow and on the cluster"
    )


def _attr(module: str, path: str, why: str) -> Any:
    try:
        obj: Any = importlib.import_module(module)
        for name in path.split("."):
            obj = getattr(obj, name)
    except (ImportError, AttributeError) as exc:
        raise unavailable(f"{module}.{path}", why, exc) from exc
    return obj


# -- the driver's own connection -----------------------------------------------------------------
def joined_cluster() -> tuple[str | None, str | None]:
    """``(gcs_address, cluster_id hex)`` this driver joined; ``(None, None)`` for Ray Client, whose
    driver runs in the cluster's client server."""
    worker = _attr("ray._private.worker", "global_worker", "to tell which cluster this process joined")
    node = getattr(worker, "node", None)
    if node is None:
        return None, None
    try:
        return node.gcs_address, node.cluster_id.hex()
    except AttributeError as exc:
        raise unavailable("Node.gcs_address and Node.cluster_id", "to tell which cluster this process joined",
                          exc) from exc


def cluster_system_config() -> dict[str, Any]:
    """The system config the joined cluster's head was started with (``ray start --system-config``), read from
    its GCS. Its entries win over a driver's own ``RAY_<name>`` environment variables."""
    state = _attr("ray._private.state", "state", "to read the cluster's system config")
    try:
        return dict(state.get_system_config())
    except AttributeError as exc:
        raise unavailable("GlobalState.get_system_config", "to read the cluster's system config", exc) from exc


def cluster_id_at(gcs_address: str, timeout_s: float) -> str:
    """The cluster id of whatever GCS answers at ``gcs_address`` now, through a fresh standalone
    client (never the driver's: Ray aborts a driver whose restarted GCS rejects its cluster id)."""
    client = _attr("ray._raylet", "InnerGcsClient.standalone", "to detect a cluster restarted behind one address")
    return client(gcs_address, None, int(timeout_s * 1000)).cluster_id.hex()


def reload_auth_config() -> None:
    """Make an imported Ray re-read ``RAY_AUTH_MODE`` and the token (as ``ray start`` does)."""
    config = _attr("ray._raylet", "Config.initialize", "to use a Ray auth token chosen after Ray was imported")
    loader = _attr("ray._raylet", "AuthenticationTokenLoader.instance", "to use a Ray auth token chosen after Ray "
                   "was imported")
    config("")
    loader().reset_cache()


def keep_loopback_addresses() -> None:
    """Switch an already imported Ray to the loopback-only mode of :data:`LOOPBACK_ONLY_ENV`."""
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is None:
        return  # not imported yet: it reads the environment variable when it is
    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        raise unavailable("ray._private.ray_constants.ENABLE_RAY_CLUSTER", "to keep the embedded head on loopback")
    constants.ENABLE_RAY_CLUSTER = False


# -- inside actors and tasks ---------------------------------------------------------------------
def session_logs_dir() -> str:
    """This Ray session's logs directory (inside the head's private temp dir)."""
    worker = _attr("ray._private.worker", "global_worker", "to find the session's logs directory")
    try:
        return str(worker.node.get_logs_dir_path())
    except AttributeError as exc:
        raise unavailable("Node.get_logs_dir_path", "to find the session's logs directory", exc) from exc


def object_locations(refs: list[Any]) -> dict[Any, dict[str, Any]]:
    """Size and node ids of each object, from Ray's object directory (experimental API)."""
    return _attr("ray.experimental", "get_object_locations", "to report where results live")(refs)


def local_object_locations(refs: list[Any]) -> dict[Any, dict[str, Any]]:
    """The same, answered by this process's own core worker (it must own the objects)."""
    return _attr("ray.experimental", "get_local_object_locations", "to report where results live")(refs)


def object_store_use(gcs_address: str) -> tuple[int, int | None] | None:
    """Bytes in the cluster's shared-memory object stores and their capacity, or None if Ray did not say.

    Ray's public API gives only the capacity (``cluster_resources()["object_store_memory"]``); the
    use comes from the text of ``ray memory --stats-only`` (its ``Plasma memory usage N MiB`` line),
    so it is known to the MiB.
    """
    import re

    import ray

    summary = _attr("ray._private.internal_api", "memory_summary", "to show the object store's use")
    text = summary(address=gcs_address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB", text)
    if found is None:
        return None
    capacity = ray.cluster_resources().get("object_store_memory")
    return int(found.group(1)) * 2**20, None if capacity is None else int(capacity)


def placement_group_cell() -> Any:
    """The closure cell holding ``placement_group``'s implementation, or None when its shape differs.

    Tune, Train and xgboost-ray import ``placement_group`` by name, so the implementation is swapped
    inside the shared wrapper (``client_mode_wrap``'s closure) rather than on the module.
    """
    # The module, not ray.util.placement_group: ray.util re-exports the function under the module's name.
    wrapper = _attr("ray.util.placement_group", "placement_group", "to release placement groups of dead tries")
    return next((c for c in (wrapper.__closure__ or ())
                 if c.cell_contents is getattr(wrapper, "__wrapped__", None)), None)


def actor_creation() -> Callable[..., Any]:
    """``ActorClass._remote``: every actor creation goes through it."""
    return _attr("ray.actor", "ActorClass._remote", "to release actors of dead tries")


def set_actor_creation(fn: Callable[..., Any]) -> None:
    import ray.actor

    ray.actor.ActorClass._remote = fn
