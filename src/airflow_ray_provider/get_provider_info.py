"""Provider metadata read by Airflow's ProvidersManager (``apache_airflow_provider`` entry point)."""

from __future__ import annotations

from typing import Any

from airflow_ray_provider import __version__, config


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-ray-provider",
        "name": "Ray",
        "description": "Run TaskFlow tasks on a Ray cluster with `@task.ray`.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Ray",
                "external-doc-url": "https://docs.ray.io/",
                "tags": ["software"],
            }
        ],
        "hooks": [{"integration-name": "Ray", "python-modules": ["airflow_ray_provider.hooks.ray"]}],
        "triggers": [{"integration-name": "Ray", "python-modules": ["airflow_ray_provider.triggers.ray"]}],
        "connection-types": [
            {
                "hook-class-name": "airflow_ray_provider.hooks.ray.RayHook",
                "hook-name": "Ray",
                "connection-type": "ray",
                "conn-fields": {
                    # No default: a pre-filled "local" here used to shadow the Host/Port the user typed.
                    # Either this field or Host/Port names the cluster; both set and different is an error.
                    "address": {
                        "label": "Ray address",
                        "schema": {"type": ["string", "null"]},
                        "description": "local, auto, host:port (GCS) or ray://host:10001 (Ray Client). "
                        "Leave empty to use Host/Port; all empty: local (the embedded head)",
                    },
                    "namespace": {
                        "label": "Ray namespace",
                        "schema": {"type": ["string", "null"], "default": "airflow"},
                    },
                    "runtime_env": {
                        "label": "Default runtime_env (JSON)",
                        "schema": {"type": ["object", "string", "null"]},
                        "description": "Merged under each task's runtime_env; env_vars are merged key by key",
                    },
                    "connect_timeout": {
                        "label": "Connect timeout (s)",
                        "schema": {"type": ["number", "null"], "default": 30},
                    },
                    "lease_timeout": {
                        "label": "Lease timeout (s)",
                        "schema": {"type": ["number", "null"], "default": 60},
                        "description": "A Ray task whose Airflow process stops polling this long is cancelled",
                    },
                    "owner_shards": {
                        "label": "Owner actors",
                        "schema": {"type": ["integer", "null"], "default": 1},
                    },
                    "checkpoint_path": {
                        "label": "Checkpoint root",
                        "schema": {"type": ["string", "null"]},
                        "description": "Where checkpoint=True tasks store results: s3://bucket/prefix, gs://…, "
                        "file:///path (default: $AIRFLOW_HOME/ray-checkpoints)",
                    },
                    "checkpoint_conn_id": {
                        "label": "Checkpoint store connection",
                        "schema": {"type": ["string", "null"]},
                        "description": "Airflow connection with the store's credentials, e.g. an aws connection "
                        "(endpoint_url for MinIO)",
                    },
                    "checkpoint_storage_options": {
                        "label": "Checkpoint storage options (JSON)",
                        "schema": {"type": ["object", "string", "null"]},
                        "description": "Extra fsspec options for the checkpoint store, e.g. {\"max_concurrency\": 1} "
                        "for s3fs",
                    },
                    "dashboard_url": {
                        "label": "Ray dashboard URL",
                        "schema": {"type": ["string", "null"]},
                        "description": "The Ray dashboard as your browser reaches it, e.g. http://ray-head:8265: "
                        "each task links to its Ray task, node and worker logs there (the embedded head: its own)",
                    },
                    "gateway_url": {
                        "label": "Gateway URL",
                        "schema": {"type": ["string", "null"]},
                        "description": "The cluster's gateway, e.g. http://ray-head:8270: tasks reach Ray over its "
                        "authenticated HTTP API, and Airflow workers need no Ray (see docs/design/gateway.md)",
                    },
                    "gateway_ca": {
                        "label": "Gateway CA bundle",
                        "schema": {"type": ["string", "null"]},
                        "description": "A CA bundle file to check the gateway's TLS certificate by (default: the "
                        "system's)",
                    },
                    "autoscaling": {
                        "label": "Cluster autoscales",
                        "schema": {"type": ["boolean", "null"], "default": False},
                        "description": "Skip the fail-fast check for resources no current node has",
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "extra"],
                    "relabeling": {"password": "Ray auth token"},
                    "placeholders": {
                        "host": "GCS host (or local, auto, ray://host); or use the Ray address field",
                        "port": "GCS port, e.g. 6379; 0 or empty for local/auto",
                        "password": "token for clusters started with RAY_AUTH_MODE=token",
                    },
                },
            }
        ],
        "extra-links": [
            "airflow_ray_provider.links.ray.RayTaskLink",
            "airflow_ray_provider.links.ray.RayNodeLink",
            "airflow_ray_provider.links.ray.RayWorkerLogsLink",
        ],
        "task-decorators": [{"class-name": "airflow_ray_provider.decorators.ray.ray_task", "name": "ray"}],
        "config": {
            "ray": {
                "description": "Ray provider settings (the XCom backend airflow_ray_provider.xcom.RayXComBackend).",
                "options": {
                    "xcom_threshold": {
                        "description": "Plain (non-Ray) tasks' XCom values whose JSON form is larger than this many "
                        "bytes are put in Ray's object store instead of the metadata DB. -1: never. "
                        "@task.ray results always stay in Ray.",
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "1048576",
                        "default": str(config.DEFAULT_XCOM_THRESHOLD),
                    },
                    "xcom_conn_id": {
                        "description": "The ray connection used for plain tasks' large XCom values.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": config.DEFAULT_CONN_ID,
                        "default": config.DEFAULT_CONN_ID,
                    },
                    "default_deferrable": {
                        "description": "Whether @task.ray tasks defer to the triggerer while their Ray task runs "
                        "when they do not say (deferrable=...). Needs a running triggerer.",
                        "version_added": "0.3.0",
                        "type": "boolean",
                        "example": "True",
                        "default": "False",
                    },
                    "ship_cluster_code": {
                        "description": "Ship the provider's cluster-side code (airflow_ray_provider.cluster) to the "
                        "Ray cluster with every connection, as a runtime_env py_module, so Ray nodes need only Ray. "
                        "False: the nodes must have this same provider version installed.",
                        "version_added": "0.2.0",
                        "type": "boolean",
                        "example": "True",
                        "default": "True",
                    },
                    "preload_modules": {
                        "description": "The scheduler imports Ray (and pyarrow, which Ray's serializer imports) "
                        "when it starts, so that every LocalExecutor task process, a fork of it, has them "
                        "already: each `@task.ray` process then saves about 0.7 s of imports. Imports only; the "
                        "scheduler never connects to Ray. Costs the scheduler about 70 MiB of memory, shared "
                        "with its forks. Celery and Kubernetes workers start their task processes otherwise.",
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": "False",
                        "default": "True",
                    },
                    "xcom_gc_interval": {
                        "description": "When a DAG run finishes, the provider's listener starts `airflow-ray xcom gc` "
                        "in the background, at most once per this many seconds. Negative: never (run the command "
                        "from cron instead).",
                        "version_added": "0.1.0",
                        "type": "float",
                        "example": "300",
                        "default": f"{config.DEFAULT_GC_INTERVAL_S:g}",
                    },
                    "checkpoint_path": {
                        "description": "Default checkpoint root when the ray connection sets none. Empty: "
                        "$AIRFLOW_HOME/ray-checkpoints.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://my-bucket/airflow-ray",
                        "default": "",
                    },
                    "checkpoint_retention": {
                        "description": "Seconds after its last write before `airflow-ray checkpoints prune` (also "
                        "started by the listener after DAG runs) deletes a task's checkpoints. Negative: keep.",
                        "version_added": "0.1.0",
                        "type": "float",
                        "example": "604800",
                        "default": f"{config.DEFAULT_CHECKPOINT_RETENTION_S:g}",
                    },
                    "xcom_retention": {
                        "description": "Seconds after a DAG run finished before `airflow-ray xcom gc` releases its "
                        "objects from Ray. Negative: keep them until their XCom rows are deleted.",
                        "version_added": "0.1.0",
                        "type": "float",
                        "example": "86400",
                        "default": f"{config.DEFAULT_XCOM_RETENTION_S:g}",
                    },
                },
            }
        },
    }
