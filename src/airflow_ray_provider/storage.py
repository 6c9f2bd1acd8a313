"""Where checkpoints go, resolved on the Airflow side: root URL plus credentials from an Airflow connection.

The ``ray`` connection's ``checkpoint_path`` / ``checkpoint_conn_id`` extras set the
default (a task's ``checkpoint_path=`` / ``checkpoint_conn_id=`` override them); the
embedded default is ``$AIRFLOW_HOME/ray-checkpoints``. Credentials are turned into plain
fsspec ``storage_options`` here, because the Ray worker that writes the checkpoint has
no Airflow (and no connections) to ask.
"""

from __future__ import annotations

from typing import Any

from airflow_ray_provider.cluster.checkpoint import Store, TaskCheckpoint, TaskKey
from airflow_ray_provider.config import checkpoint_path as default_root
from airflow_ray_provider.exceptions import CheckpointError

# Storage protocols a checkpoint location read back from the metadata DB may use (no http, no memory://).
STORAGE_PROTOCOLS = {"file", "local", "s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "hdfs", "oss"}


def store_for(ray_conn_id: str, path: str | None = None, conn_id: str | None = None) -> tuple[Store, str | None]:
    """The checkpoint store for a task and the connection id of its credentials.

    A task's own overrides win, then its ``ray`` connection's extras, then the default.
    """
    from airflow_ray_provider.hooks.ray import RayHook

    settings = RayHook(ray_conn_id).settings
    root = path or settings.checkpoint_path or default_root()
    store_conn = store_conn_id(settings, conn_id)
    return make_store(root, store_conn, settings.checkpoint_storage_options), store_conn


def store_conn_id(settings: Any, conn_id: str | None) -> str | None:
    """The connection with a task's checkpoint credentials: its own ``checkpoint_conn_id``, else its ``ray``
    connection's (``settings`` are that connection's :class:`~airflow_ray_provider.hooks.settings.RaySettings`)."""
    return conn_id if conn_id is not None else settings.checkpoint_conn_id


def make_store(root: str, conn_id: str | None, extra_options: dict[str, Any] | None = None) -> Store:
    """A :class:`Store` for ``root``; ``extra_options`` (plain fsspec options, e.g. s3fs's
    ``max_concurrency``) go over what the connection gives."""
    if root.startswith("file://"):
        root = root[len("file://"):]
    Store(root)  # validates the root before any connection is read
    from airflow_ray_provider.config import secret_key

    # The secret travels to the Ray worker inside the Store: the cluster is trusted, and the
    # worker signs the manifests it writes and verifies the ones it reuses.
    return Store(root, {**storage_options(conn_id, _protocol(root)), **(extra_options or {})}, secret=secret_key())


def _protocol(root: str) -> str:
    return root.split("://", 1)[0] if "://" in root else "file"


def storage_options(conn_id: str | None, protocol: str) -> dict[str, Any]:
    """Plain, picklable fsspec options for ``protocol`` from the Airflow connection ``conn_id``."""
    if protocol in ("file", "local") or not conn_id:
        return {}
    if protocol in ("s3", "s3a"):
        return _s3_options(conn_id)
    from airflow.sdk import ObjectStoragePath
    from ray import cloudpickle

    try:
        options = dict(ObjectStoragePath(f"{protocol}://checkpoints", conn_id=conn_id).fs.storage_options)
        cloudpickle.dumps(options)
    except Exception as exc:
        raise CheckpointError(f"Cannot turn connection {conn_id!r} into storage options for {protocol}:// "
                              f"checkpoints: {type(exc).__name__}: {exc}") from exc
    return options


def _s3_options(conn_id: str) -> dict[str, Any]:
    """s3fs options from an ``aws`` connection: keys, session token, endpoint (MinIO), region, botocore config."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    hook = S3Hook(aws_conn_id=conn_id)
    try:
        credentials = hook.get_credentials()
    except Exception as exc:
        raise CheckpointError(f"Cannot get S3 credentials from connection {conn_id!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
    options: dict[str, Any] = {}
    if credentials is not None and credentials.access_key:
        options.update(key=credentials.access_key, secret=credentials.secret_key)
        if credentials.token:
            options["token"] = credentials.token
    endpoint = hook.conn_config.get_service_endpoint_url(service_name="s3")
    if endpoint:
        options["endpoint_url"] = endpoint
    if hook.conn_region_name:
        options["client_kwargs"] = {"region_name": hook.conn_region_name}
    config_kwargs = hook.conn_config.extra_config.get("config_kwargs")
    if isinstance(config_kwargs, dict):
        options["config_kwargs"] = dict(config_kwargs)
    return options


def checkpoint_of(reference: dict[str, Any], dag_id: str, run_id: str, task_id: str, map_index: int,
                  extra_options: dict[str, Any] | None = None) -> TaskCheckpoint:
    """Rebuild a task's checkpoint from the location an XCom reference records.

    The recorded URL must end in exactly the folder layout this task's ids give, so a
    forged row cannot point the reader at some other file in the store.
    """
    key = TaskKey(dag_id, run_id, task_id, map_index)
    uri = reference["uri"]
    suffix = "/" + "/".join([*key.segments(), "result", "manifest.json"])
    if not uri.endswith(suffix):
        raise CheckpointError(f"Checkpoint location {uri!r} does not match the task it is recorded for "
                              f"(expected it to end in {suffix!r})")
    root = uri[: -len(suffix)]
    if _protocol(root) not in STORAGE_PROTOCOLS:
        raise CheckpointError(f"Checkpoint location {uri!r} uses protocol {_protocol(root)!r}; allowed are "
                              f"{sorted(STORAGE_PROTOCOLS)}")
    return TaskCheckpoint(make_store(root, reference.get("conn_id"), extra_options), key)
