"""The gateway of a connection, ready to use: found, checked, and brought up when it is not there (issue 24,
decision 3 of docs/design/gateway.md).

Nothing is run by hand on the head and nothing of ours needs to be installed there: when the gateway does not
answer, or answers from another provider version, this submits it as a Ray job through Ray's Jobs REST API on the
dashboard port (the connection's ``dashboard_url``, with its Ray auth token). The job's code is the provider's
cluster-side code and ``cloudpickle`` (which a stock Ray node lacks and every call through the gateway is pickled
with), uploaded once as a zip named by its content. Its entrypoint (``python -m
airflow_ray_provider.cluster.gateway``) starts the gateway, replacing one of another version, and stays as its
driver. The job's submission id names the provider version and the zip, and Ray refuses a second submission of
one id, so processes that bootstrap at once start one gateway; later processes find it answering.

Imports no Ray: this is how an Airflow process without Ray reaches a cluster for the first time.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import cloudpickle
import httpx

from airflow_ray_provider import __version__, bundle
from airflow_ray_provider.cluster import gateway_api as api
from airflow_ray_provider.exceptions import GatewayError, GatewayVersionMismatch, RayVersionMismatch
from airflow_ray_provider.gateway_client import GatewayClient, client_for

if TYPE_CHECKING:
    from airflow_ray_provider.hooks.settings import RaySettings

JOB_PREFIX = "airflow-ray-gateway"
# From the job's submission to the gateway answering: a runtime environment to set up on the head (the zip is
# small), an interpreter that imports Ray, and the actor's start. Minutes on a loaded 2-core machine.
START_TIMEOUT_S = 300.0
DASHBOARD_TIMEOUT_S = 60.0
_CHECK_EVERY_S = 1.0
_TERMINAL = ("FAILED", "STOPPED", "SUCCEEDED")
_lock = threading.Lock()


@dataclass(frozen=True)
class GatewayPackage:
    """What the gateway's job runs: the zip of its code and where Ray's store keeps it."""

    data: bytes

    @functools.cached_property
    def name(self) -> str:
        return f"_ray_pkg_{hashlib.sha1(self.data, usedforsecurity=False).hexdigest()}.zip"

    @property
    def uri(self) -> str:
        return f"gcs://{self.name}"

    @property
    def submission_id(self) -> str:
        return f"{JOB_PREFIX}-{__version__}-{self.name[len('_ray_pkg_'):][:12]}"


@functools.cache
def gateway_package() -> GatewayPackage:
    return GatewayPackage(bundle.package_zip(cloudpickle))


def ready_gateway(settings: RaySettings) -> GatewayClient:
    """This process's client for the connection's gateway, after the gateway answered with this provider's API,
    version and Python; brought up through the Jobs API first where it did not (once per process and gateway)."""
    client = client_for(settings)
    if client.checked:
        return client
    with _lock:
        try:
            client.check_version()
            return client
        except GatewayError as exc:
            if exc.status != 0:  # it answered, and refused: a key or a proxy problem that a new job cannot fix
                raise
            why = f"it does not answer ({exc})"
        except GatewayVersionMismatch as exc:
            why = str(exc)
        bootstrap(settings, client, why)
        client.check_version()
        return client


def bootstrap(settings: RaySettings, client: GatewayClient, why: str) -> None:
    """Submit the gateway's job through the dashboard's Jobs API, then wait until the gateway answers."""
    if settings.dashboard_url is None:
        raise GatewayError(f"The gateway at {client.url} cannot be used: {why}. Set the connection's dashboard_url "
                           f"(the Ray dashboard, e.g. http://ray-head:8265) so that the provider can start it "
                           f"through Ray's Jobs API, or start it on the head: AIRFLOW_RAY_GATEWAY_KEY=<key> python -m "
                           f"airflow_ray_provider.cluster.gateway --host 0.0.0.0 --port {api.DEFAULT_PORT}")
    package = gateway_package()
    headers = {"Authorization": f"Bearer {settings.auth_token}"} if settings.auth_token else {}
    with httpx.Client(base_url=settings.dashboard_url, headers=headers, timeout=DASHBOARD_TIMEOUT_S,
                      verify=settings.gateway_ca or True, follow_redirects=False) as dashboard:
        _answer(dashboard, "GET", "/api/version")
        # The GET also pins an uploaded package for 10 minutes, so it is not collected before the job uses it.
        if dashboard.get(f"/api/packages/gcs/{package.name}").status_code == 404:
            _answer(dashboard, "PUT", f"/api/packages/gcs/{package.name}", content=package.data)
        # Loopback when Airflow reaches the head on loopback; else every interface, as the dashboard's own port
        # (every request is signed with the deployment's key, and TLS goes in front as an ingress).
        host = urlsplit(client.url).hostname or ""
        bind = "127.0.0.1" if host in ("127.0.0.1", "localhost", "::1") else "0.0.0.0"
        port = urlsplit(client.url).port or api.DEFAULT_PORT
        job = {
            "entrypoint": f"python -m airflow_ray_provider.cluster.gateway --host {bind} --port {port}",
            "submission_id": package.submission_id,
            "runtime_env": {"py_modules": [package.uri], "env_vars": {api.KEY_ENV: client.key.hex()}},
            "metadata": {"airflow_ray_provider": __version__, "why": why[:200]},
        }
        submitted = dashboard.post("/api/jobs/", json=job)
        if submitted.status_code != 200 and "already exists" not in submitted.text:
            raise GatewayError(f"The Ray dashboard at {settings.dashboard_url} refused the gateway's job "
                               f"({submitted.status_code}): {submitted.text[-800:]}", submitted.status_code)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                remote = client.version()
            except GatewayError as exc:
                if exc.status != 0:
                    raise
            else:
                if remote.get("provider") == __version__:
                    return
            state = _answer(dashboard, "GET", f"/api/jobs/{package.submission_id}").json()
            if state.get("status") in _TERMINAL:
                logs = dashboard.get(f"/api/jobs/{package.submission_id}/logs").json().get("logs", "")
                raise GatewayError(f"The gateway's Ray job {package.submission_id} ended {state.get('status')} "
                                   f"before the gateway at {client.url} answered: {state.get('message')}\n"
                                   f"{logs[-3000:]}")
            if time.monotonic() > deadline:
                raise GatewayError(f"The gateway at {client.url} did not answer within {START_TIMEOUT_S:g} s of "
                                   f"its Ray job {package.submission_id} ({state.get('status')}); see that job's "
                                   f"logs in the Ray dashboard")
            time.sleep(_CHECK_EVERY_S)


def test_gateway(settings: RaySettings) -> tuple[bool, str]:
    """The Test button for a connection through a gateway: asks it (bounded by ``connect_timeout``), and where it
    does not answer yet, the dashboard that would start it. Starts nothing, imports no Ray."""
    assert settings.gateway_url is not None
    # A client of its own, bounded by connect_timeout, not this process's cached one (bounded for tasks).
    with GatewayClient(settings.gateway_url, client_for(settings).key, timeout=settings.connect_timeout,
                       verify=settings.gateway_ca or True) as client:
        try:
            client.check_version()
            status = client.status()
        except GatewayVersionMismatch as exc:
            if settings.dashboard_url is None:
                return False, str(exc)
            return True, f"{exc}; the next task replaces it through the Ray dashboard at {settings.dashboard_url}"
        except GatewayError as exc:
            if exc.status != 0:
                return False, str(exc)
            if settings.dashboard_url is None:
                return False, (f"The gateway at {settings.gateway_url} does not answer ({exc}); set the "
                               f"connection's dashboard_url so that the first task starts it through Ray's Jobs API")
            try:
                with httpx.Client(base_url=settings.dashboard_url, timeout=settings.connect_timeout,
                                  verify=settings.gateway_ca or True, headers={"Authorization": f"Bearer "
                                  f"{settings.auth_token}"} if settings.auth_token else {}) as dashboard:
                    ray_version = _answer(dashboard, "GET", "/api/version").json().get("ray_version")
            except GatewayError as dash_exc:
                return False, f"The gateway at {settings.gateway_url} does not answer, and {dash_exc}"
            return True, (f"The gateway at {settings.gateway_url} does not answer yet; the first task starts it "
                          f"through the Ray dashboard at {settings.dashboard_url} (Ray {ray_version})")
        except RayVersionMismatch as exc:  # the cluster's Python: nothing here can fix it
            return False, str(exc)
    cpus = status.get("resources", {}).get("CPU", 0)
    return True, (f"Connected through the gateway at {settings.gateway_url}: Ray {status.get('ray')}, "
                  f"{status.get('nodes')} node(s), {cpus:g} CPUs")


def _answer(http: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        response = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise GatewayError(f"The Ray dashboard at {http.base_url} did not answer {method} {path}: {exc}") from exc
    if response.status_code != 200:
        hint = " (the connection's password must be the cluster's Ray auth token)" if response.status_code in (
            401, 403) else ""
        raise GatewayError(f"The Ray dashboard at {http.base_url} refused {method} {path} ({response.status_code})"
                           f"{hint}: {response.text[-500:]}", response.status_code)
    return response
