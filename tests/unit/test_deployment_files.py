"""docker-compose.yaml and docker/Dockerfile: no Docker engine here, so the file is checked for what would break.

Parsed with PyYAML (merge keys resolved), then: the services exist and depend only on services that
exist, every Airflow component and Ray node runs the one image built from docker/Dockerfile, the
Python and Ray versions agree with pyproject.toml, and the connections the provider reads point at
the services that serve them.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (the oldest smoke set collects this module too): pytest itself depends on tomli there
    import tomli as tomllib

from airflow_ray_provider.hooks.settings import RaySettings
from tests.support import ROOT

AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker"}
RAY_SERVICES = {"ray-head", "ray-worker"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: str(v) for k, v in raw.items()}


def command(service: dict[str, Any]) -> list[str]:
    raw = service.get("command", [])
    return shlex.split(raw) if isinstance(raw, str) else list(raw)


def option(args: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in a command line."""
    for n, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}":
            return args[n + 1]
    raise AssertionError(f"--{name} missing from {args}")


def test_all_services_exist_and_depend_on_existing_services(services: dict[str, Any]) -> None:
    expected = {"postgres", "redis", "minio", "minio-init"} | AIRFLOW_SERVICES | RAY_SERVICES
    assert expected <= set(services), expected - set(services)
    for name, service in services.items():
        for needed in service.get("depends_on") or {}:
            assert needed in services, f"{name} depends on unknown service {needed}"
    assert services["airflow-worker"]["deploy"]["replicas"] >= 2
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_one_image_with_pyprojects_python_and_ray(services: dict[str, Any]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    builds = {json.dumps(services[n].get("build"), sort_keys=True) for n in AIRFLOW_SERVICES | RAY_SERVICES}
    images = {services[n].get("image") for n in AIRFLOW_SERVICES | RAY_SERVICES}
    assert len(builds) == 1 and len(images) == 1, (builds, images)  # client and cluster: the same Ray
    assert services["ray-head"]["build"]["dockerfile"] == "docker/Dockerfile"

    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M)
    allowed = re.fullmatch(r">=(\d+\.\d+),<(\d+\.\d+)", pyproject["requires-python"])
    assert python and allowed, (python, pyproject["requires-python"])
    low, high = (tuple(map(int, v.split("."))) for v in allowed.groups())
    assert low <= tuple(map(int, python[1].split("."))) < high

    # The image runs the main tested set: constraints.txt's Ray, inside pyproject's range.
    ray_pin = next(d for d in pyproject["dependencies"] if d.startswith("ray["))
    ray_version = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)[1]
    low_ray, high_ray = re.fullmatch(r"ray\[default\]>=(\S+),<(\S+)", ray_pin).groups()
    as_tuple = lambda v: tuple(map(int, v.split(".")))  # noqa: E731
    assert as_tuple(low_ray) <= as_tuple(ray_version) < as_tuple(high_ray)
    assert f"-py{python[1]}" in next(iter(images)) and ray_version in next(iter(images))
    # Installed from this checkout, pinned by the same constraints, with what the compose file needs.
    install = re.search(r"uv pip install --system -c constraints\.txt \"\.\[([a-z0-9,]+)\]\"", dockerfile)
    assert install, "the Dockerfile must install this checkout with -c constraints.txt"
    extras = set(install[1].split(","))
    assert {"s3", "examples", "deploy"} <= extras <= set(pyproject["optional-dependencies"])


def test_airflow_runs_celery_on_the_compose_redis_and_postgres(services: dict[str, Any]) -> None:
    pg = env(services["postgres"])
    for name in AIRFLOW_SERVICES:
        e = env(services[name])
        assert e["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        db = urlsplit(e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        assert (db.hostname, db.username, db.password, db.path.lstrip("/")) == (
            "postgres", pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
        assert urlsplit(e["AIRFLOW__CELERY__BROKER_URL"]).hostname == "redis"
        assert urlsplit(e["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).hostname == "airflow-apiserver"
        assert e["AIRFLOW__CORE__XCOM_BACKEND"] == "airflow_ray_provider.xcom.RayXComBackend"
        mounts = dict(v.split(":")[:2] for v in services[name].get("volumes", []))
        if name != "airflow-init":
            assert mounts["./example_dags"] == e["AIRFLOW__CORE__DAGS_FOLDER"]
            password_file = e["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
            source = next(src for src, dst in mounts.items() if dst == password_file)
            users = e["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(":")[0]
            assert users in json.loads((ROOT / source).read_text())
    worker = command(services["airflow-worker"])
    assert worker[:2] == ["bash", "-c"]
    # The worker joins Ray as a CPU-less node (a driver needs a local raylet), then runs Celery.
    assert worker[2].split() == ["ray", "start", f"--address=ray-head:{option(command(services['ray-head']), 'port')}",
                                 "--num-cpus=0", "--disable-usage-stats", "&&", "exec", "airflow", "celery", "worker"]
    # One signing secret for every component: a reference written by a worker must verify in the others.
    secrets = {env(services[name]).get("AIRFLOW__RAY__SECRET_KEY") for name in AIRFLOW_SERVICES}
    assert len(secrets) == 1 and len(secrets.pop() or "") >= 32


def test_the_ray_connection_reaches_the_head_and_the_checkpoint_bucket(services: dict[str, Any]) -> None:
    e = env(services["airflow-worker"])
    conn = json.loads(e["AIRFLOW_CONN_RAY_DEFAULT"])
    settings = RaySettings.from_fields(extra=conn["extra"])  # the provider's own parsing accepts it
    host, port = str(settings.address).split(":")
    head = command(services["ray-head"])
    assert host == "ray-head" and port == option(head, "port") and port != "6379"  # 6379 is Redis's
    assert option(command(services["ray-worker"]), "address") == f"ray-head:{port}"
    assert "--head" in head and "--block" in head and "--block" in command(services["ray-worker"])
    # The checkpoint bucket is created at start, and its credentials are MinIO's.
    bucket = urlsplit(settings.checkpoint_path)
    assert bucket.scheme == "s3"
    assert f"mb --ignore-existing local/{bucket.hostname}" in services["minio-init"]["entrypoint"]
    store = json.loads(e[f"AIRFLOW_CONN_{settings.checkpoint_conn_id.upper()}"])
    minio = env(services["minio"])
    assert store["conn_type"] == "aws"
    assert (store["login"], store["password"]) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    assert urlsplit(store["extra"]["endpoint_url"]).hostname == "minio"
