"""The Airflow side of the gateway: one class in front of the cluster's HTTP door (issue 24; design:
docs/design/gateway.md). It imports no Ray: a process that only talks to the gateway needs none installed.

Every request is signed with the key derived from ``[ray] secret_key`` (``gateway_auth``); every answer is
checked against that key and the request's nonce before anything of it is used, and a value is unpickled only
after its whole stream matched the gateway's signed trailer.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import pickle
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import cloudpickle
import httpx

from airflow_ray_provider.cluster import gateway_api as api
from airflow_ray_provider.cluster.gateway_auth import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    derive_key,
    sign_request,
    verify_response,
)
from airflow_ray_provider.cluster.naming import STATE_ONLY_OFFSET
from airflow_ray_provider.exceptions import (
    GatewayAuthError,
    GatewayError,
    GatewayVersionMismatch,
    RayObjectLost,
    RayVersionMismatch,
    RayWaitTimeout,
)
from airflow_ray_provider.serialization import find_unpicklable
from airflow_ray_provider.task_run import POLL_S, TaskRun

if TYPE_CHECKING:
    from airflow_ray_provider.hooks.settings import RaySettings

# Each answer is bounded: a poll waits up to its own ``wait`` inside the gateway, plus this.
REQUEST_TIMEOUT_S = 60.0
# A split unpickles the whole value in a Ray task and stores each item (the gateway waits as long).
SPLIT_TIMEOUT_S = 660.0
# How long a request about a run is asked again while the gateway does not answer (a restart takes seconds), and
# the HTTP statuses that mean "not now" rather than "no".
RETRY_S = 60.0
RETRY_MIN_S = 5.0
TRANSIENT = (0, 502, 503, 504)
# Keys per release request (they go in its query string; aiohttp takes 8 KiB of request line).
RELEASE_BATCH = 40
# A value larger than this is spooled to a temporary file while its stream is checked, not held in memory.
SPOOL_BYTES = 64 * 1024 * 1024


class GatewayClient:
    """Calls the gateway at ``url`` (``http://host:port`` or ``https://…``) with the deployment's gateway key."""

    def __init__(self, url: str, key: bytes, *, timeout: float = REQUEST_TIMEOUT_S,
                 verify: bool | str = True) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the gateway URL must be http(s)://host:port; got {url!r}")
        self.url = url.rstrip("/")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._base_path = parts.path.rstrip("/")
        self._key = key
        self._http = httpx.Client(timeout=timeout, verify=verify, follow_redirects=False)
        self._checked_version = False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API -----------------------------------------------------------------------------------------
    def version(self) -> dict[str, Any]:
        return self._json("GET", "/version")

    @property
    def checked(self) -> bool:
        """Whether ``check_version`` passed for this client."""
        return self._checked_version

    @property
    def key(self) -> bytes:
        """The gateway key, for the gateway's own job and other clients of it (gateway_bootstrap)."""
        return self._key

    def check_version(self) -> None:
        """Once per client, before the first pickle is sent: the gateway runs this provider version and API
        (else ``GatewayVersionMismatch``), and the cluster's Python is this one's minor version (a callable
        pickled by value loads in no other; else ``RayVersionMismatch``)."""
        from airflow_ray_provider import __version__

        if self._checked_version:
            return
        remote = self.version()
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if remote.get("api") != api.API_VERSION or remote.get("provider") != __version__:
            raise GatewayVersionMismatch(
                f"The gateway at {self.url} runs airflow-ray-provider {remote.get('provider')} (API "
                f"{remote.get('api')!r}), this process {__version__} (API {api.API_VERSION!r}): a new gateway job "
                f"replaces it when the connection has a dashboard_url")
        if remote.get("python") != here:
            raise RayVersionMismatch(f"The Ray cluster behind the gateway at {self.url} runs Python "
                                     f"{remote.get('python')}, this process {here}: a task's callable, pickled "
                                     f"here, loads only in the same Python minor version. Run Airflow's workers "
                                     f"on Python {remote.get('python')}")
        self._checked_version = True

    def status(self) -> dict[str, Any]:
        """The cluster's resources (total, available, per node) and its number of live nodes."""
        return self._json("GET", "/status")

    def openapi(self) -> dict[str, Any]:
        return self._json("GET", "/openapi.json")

    def submit(self, key: str, namespace: str, shard: int, parts: tuple[Any, ...], options: Mapping[str, Any],
               lease_s: float, hold_s: float = 0.0, inputs: Sequence[api.HeldInputRequest] = ()) -> dict[str, Any]:
        """Run ``parts`` (``(callable bytes, args, kwargs[, checkpoint job])``, upstream results as
        ``gateway_api.HeldInput`` naming ``inputs``) as Ray task ``key``, owned by owner ``shard``."""
        return self.submit_pickled(key, namespace, shard, cloudpickle.dumps(parts, protocol=5), options, lease_s,
                                   hold_s, inputs)

    def submit_pickled(self, key: str, namespace: str, shard: int, payload: bytes, options: Mapping[str, Any],
                       lease_s: float, hold_s: float = 0.0,
                       inputs: Sequence[api.HeldInputRequest] = ()) -> dict[str, Any]:
        """``submit`` with ``parts`` already cloudpickled (``payload``): pickled once, however often it is sent."""
        self.check_version()
        call: api.CallRequest = {
            "key": key, "namespace": namespace, "shard": shard, "options": dict(options), "lease_s": lease_s,
            "hold_s": hold_s, "payload": base64.b64encode(payload).decode(), "inputs": list(inputs)}
        return self._json("POST", "/calls", body=json.dumps(call).encode())

    def poll(self, key: str, namespace: str, shard: int, log_offset: int = 0, wait: float = 0.0) -> dict[str, Any]:
        """The run's state, its log lines from ``log_offset`` and its events, waiting up to ``wait`` s for news."""
        return self._json("GET", "/calls/poll", self._run(key, namespace, shard, log_offset=log_offset, wait=wait),
                          timeout=REQUEST_TIMEOUT_S + wait)

    def cancel(self, key: str, namespace: str, shard: int) -> bool:
        return bool(self._json("POST", "/calls/cancel", self._run(key, namespace, shard))["cancelled"])

    def set_lease(self, key: str, namespace: str, shard: int, lease_s: float, hold_s: float = 0.0) -> bool:
        return bool(self._json("POST", "/calls/lease", self._run(key, namespace, shard, lease_s=lease_s,
                                                                  hold_s=hold_s))["held"])

    def describe(self, key: str, namespace: str, shard: int) -> dict[str, Any]:
        """Size, nodes and summary of the finished object ``key`` (waits for its run to end)."""
        return self._json("GET", "/objects", self._run(key, namespace, shard))

    def split(self, key: str, namespace: str, shard: int, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Replace the list or dict object ``key`` by one object per item (``key#0``, ``key#1``...), each
        described; ``names``: a dict's keys, in order."""
        body = json.dumps({} if names is None else {"names": list(names)}).encode()
        return self._json("POST", "/objects/split", self._run(key, namespace, shard), body=body,
                          timeout=SPLIT_TIMEOUT_S)

    def release(self, keys: Sequence[str], namespace: str, shard: int) -> int:
        """Let owner ``shard`` drop ``keys``; how many it held. Sent in batches: keys go in the query string."""
        released = 0
        for start in range(0, len(keys), RELEASE_BATCH):
            query = [("namespace", namespace), ("shard", str(shard)),
                     *(("key", k) for k in keys[start:start + RELEASE_BATCH])]
            released += int(self._json("DELETE", "/objects", query)["released"])
        return released

    def inventory(self, namespace: str, shard: int) -> dict[str, dict[str, Any]]:
        """Every key owner ``shard`` holds: its state, finish time, size and hold (``TaskOwner.inventory``)."""
        return self._json("GET", "/objects/inventory", {"namespace": namespace, "shard": shard})

    def value(self, key: str, namespace: str, shard: int) -> Any:
        """The object's value, streamed and checked against the gateway's signed trailer before it is unpickled."""
        return self._pickle("/objects/value", key, namespace, shard)

    def error(self, key: str, namespace: str, shard: int) -> BaseException:
        """The exception failed call ``key`` raised, checked as a value is."""
        return self._pickle("/calls/error", key, namespace, shard)

    def _pickle(self, endpoint: str, key: str, namespace: str, shard: int) -> Any:
        path, query = self._path(endpoint), urlencode(self._run(key, namespace, shard))
        headers = sign_request(self._key, "GET", path, query)
        digest = hashlib.sha256()
        tail = b""
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            try:
                with self._http.stream("GET", f"{self._origin}{path}?{query}", headers=headers) as response:
                    if response.status_code != 200:
                        response.read()
                        self._check(response, headers[HEADER_NONCE], "GET", path)
                    for chunk in response.iter_bytes():
                        tail += chunk
                        if len(tail) > api.TRAILER_BYTES:
                            body, tail = tail[:-api.TRAILER_BYTES], tail[-api.TRAILER_BYTES:]
                            digest.update(body)
                            spool.write(body)
            except httpx.HTTPError as exc:
                raise GatewayError(f"The gateway at {self.url} did not answer GET {path}: {exc}") from exc
            verify_response(self._key, headers[HEADER_NONCE], 200, digest.hexdigest(), tail.decode(errors="replace"))
            spool.seek(0)
            return pickle.load(spool)  # signed by the deployment's gateway: checked just above

    # -- requests ----------------------------------------------------------------------------------------
    @staticmethod
    def _run(key: str, namespace: str, shard: int, **more: Any) -> dict[str, Any]:
        return {"namespace": namespace, "shard": shard, "key": key, **more}

    def _path(self, path: str) -> str:
        return f"{self._base_path}{api.PREFIX}{path}"

    def _json(self, method: str, path: str, params: Mapping[str, Any] | Sequence[tuple[str, str]] | None = None,
              body: bytes = b"", timeout: float | None = None) -> Any:
        full = self._path(path)
        query = urlencode(params or {})
        headers = sign_request(self._key, method, full, query, body)
        if body:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, f"{self._origin}{full}" + (f"?{query}" if query else ""),
                                          content=body, headers=headers,
                                          timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise GatewayError(f"The gateway at {self.url} did not answer {method} {full}: {exc}") from exc
        self._check(response, headers[HEADER_NONCE], method, full)
        return response.json()

    def _check(self, response: httpx.Response, nonce: str, method: str, path: str) -> None:
        """The answer is the deployment's gateway's (else ``GatewayAuthError``) and a success (else
        ``GatewayError`` with the gateway's reason)."""
        signature = response.headers.get(HEADER_SIGNATURE)
        if response.status_code == 401 and signature is None:
            raise GatewayAuthError(f"The gateway at {self.url} refused {method} {path} as unauthenticated: "
                                   f"{_reason(response)}. Airflow and the gateway must share [ray] secret_key")
        verify_response(self._key, nonce, response.status_code, response.content, signature)
        if response.status_code >= 300:
            raise GatewayError(f"The gateway at {self.url} refused {method} {path} ({response.status_code}): "
                               f"{_reason(response)}", response.status_code)


_clients_lock = threading.Lock()


@functools.cache
def _client(url: str, key: bytes, ca: str | None) -> GatewayClient:
    return GatewayClient(url, key, verify=ca or True)


def client_for(settings: RaySettings) -> GatewayClient:
    """This process's client for the connection's gateway (one per gateway: its HTTP connections are reused)."""
    from airflow_ray_provider.config import secret_key

    if settings.gateway_url is None:
        raise ValueError("the connection names no gateway_url")
    with _clients_lock:
        return _client(settings.gateway_url, derive_key(secret_key()), settings.gateway_ca)


class GatewayTaskRun(TaskRun):
    """One submitted Ray task, followed through the cluster's gateway: this process needs no Ray."""

    def __init__(self, *, client: GatewayClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = client

    def _call(self, what: str, call: Callable[[], Any], bound: float | None = None) -> Any:
        """One request about this run, asked again while the gateway does not answer or says it is unavailable (a
        gateway restarted by Ray is back in seconds; the run, held by its owner, goes on meanwhile), for up to
        ``bound`` s (default ``RETRY_S``). Past that the owner counts as unresponsive, as after a driver's bounded
        wait, and the error names the task and key."""
        deadline = time.monotonic() + (RETRY_S if bound is None else bound)
        pause = 0.25
        while True:
            try:
                return call()
            except GatewayError as exc:
                if exc.status not in TRANSIENT:
                    raise
                if time.monotonic() + pause > deadline:
                    self.owner_unresponsive = True
                    raise RayWaitTimeout(f"{what} of Ray task {self.task_label} (key {self.key}) through the gateway "
                                         f"at {self.client.url}: {exc}") from exc
                self.log.warning("The gateway did not answer %s of Ray task %s (key %s); asking again in %.2fs: %s",
                                 what, self.task_label, self.key, pause, exc)
                time.sleep(pause)  # a bounded back-off before the same idempotent request, not a wait for a result
                pause = min(2 * pause, 4.0)

    def submit(self, fn: Callable[..., Any] | bytes, args: tuple[Any, ...], kwargs: Mapping[str, Any],
               options: Mapping[str, Any], job: Any = None, inputs_digest: str | None = None,
               fingerprint: str | None = None, inputs: Sequence[Mapping[str, Any]] = ()) -> None:
        parts = self.call_parts(fn, args, kwargs, job, inputs_digest, fingerprint)
        try:
            payload = cloudpickle.dumps(parts, protocol=5)
        except Exception as exc:
            raise find_unpicklable(tuple(args), kwargs, self.task_label) from exc
        held = [api.HeldInputRequest(namespace=str(i["namespace"]), shard=int(i["shard"]), key=str(i["key"]))
                for i in inputs]
        asked = 0

        def submit() -> Any:
            nonlocal asked
            asked += 1
            try:
                return self.client.submit_pickled(self.key, self.namespace, self.shard, payload, options,
                                                  self.lease_s, self.hold_s, held)
            except GatewayError as exc:
                # Asked again after no answer: the first request may have reached the owner, which refuses a key
                # it holds. The key is this try's own (it ends in a random part), so the run is ours.
                if asked > 1 and exc.status == 409 and "already in use" in str(exc):
                    return None
                raise

        try:
            self._call("submit", submit)
        except RayWaitTimeout:
            self.submitted = True  # it may have started: cancel() and release() must still reach the owner
            raise
        self.submitted = True

    def state(self) -> dict[str, Any]:
        return self._call("status", lambda: self.client.poll(self.key, self.namespace, self.shard,
                                                              STATE_ONLY_OFFSET))

    def set_lease(self, lease_s: float, hold_s: float = 0.0) -> None:
        self.lease_s, self.hold_s = lease_s, hold_s
        if not self._call("set_lease", lambda: self.client.set_lease(self.key, self.namespace, self.shard, lease_s,
                                                                      hold_s)):
            raise RayObjectLost(f"{self.owner_label} no longer holds Ray task {self.task_label} (key {self.key})")

    def poll(self, offset: int) -> dict[str, Any]:
        # The owner reaps a run nobody polled for its lease: asking longer than that cannot find it running.
        return self._call("poll", lambda: self.client.poll(self.key, self.namespace, self.shard, offset,
                                                            wait=POLL_S), bound=max(self.lease_s, RETRY_MIN_S))

    def fetch(self) -> Any:
        return self._call("value", lambda: self.client.value(self.key, self.namespace, self.shard))

    def remote_cause(self) -> BaseException | None:
        try:
            return self.client.error(self.key, self.namespace, self.shard)
        except Exception as exc:  # noqa: BLE001 - e.g. the exception's class cannot be unpickled here
            # Kept as the failure's cause; logged because an Airflow skip/fail raised remotely is lost with it.
            self.log.warning("Could not rebuild the remote exception of Ray task %s (key %s) here: %r",
                             self.task_label, self.key, exc)
            return exc

    def describe(self) -> dict[str, Any]:
        return self._call("describe", lambda: self.client.describe(self.key, self.namespace, self.shard))

    def split(self, names: Sequence[str] | None) -> list[dict[str, Any]]:
        return self._call("split", lambda: self.client.split(self.key, self.namespace, self.shard, names))

    def send_cancel(self, wait: bool) -> None:
        # Over HTTP there is no fire-and-forget: the request is sent either way; the owner answers within 10 s.
        self._call("cancel", lambda: self.client.cancel(self.key, self.namespace, self.shard))

    def release(self) -> None:
        if self.submitted:
            try:
                self.client.release([self.key], self.namespace, self.shard)
            except GatewayError as exc:  # the lease reaps it; a release must not fail the task
                self.log.warning("Could not release Ray task %s (key %s) through the gateway: %s",
                                 self.task_label, self.key, exc)


class GatewayWatch:
    """What a deferred task's trigger asks about its run, through the gateway, answered in the shapes the watcher
    subprocess answers (``triggers.watcher``): ``{"state", "error"}``, ``{"cancelled"}``, or ``{"fault": why}``
    when the gateway cannot be asked. Each request runs in a worker thread: the triggerer's loop never blocks, and
    no subprocess is started. A poll renews the run's lease in its owner, as every poll does."""

    def __init__(self, client: GatewayClient) -> None:
        self.client = client

    async def poll(self, namespace: str, shard: int, key: str) -> dict[str, Any]:
        try:
            status = await asyncio.to_thread(self.client.poll, key, namespace, shard, STATE_ONLY_OFFSET)
        except GatewayError as exc:
            return {"fault": str(exc)}
        return {"state": status["state"], "error": status.get("error")}

    async def cancel(self, namespace: str, shard: int, key: str) -> dict[str, Any]:
        try:
            return {"cancelled": await asyncio.to_thread(self.client.cancel, key, namespace, shard)}
        except GatewayError as exc:
            return {"fault": str(exc)}


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]
