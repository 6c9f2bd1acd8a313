"""The gateway: one authenticated HTTP door into the cluster, so an Airflow process needs no Ray (issue 24; design
and why: docs/design/gateway.md).

An aiohttp app served from a thread of a detached actor on the head node (``GatewayActor``), started by
``ensure_gateway``. It keeps no state: every call goes to the owner actors (``owner.TaskOwner``), which hold the
runs and their results, so a restarted gateway (Ray restarts the actor, which serves again from its constructor)
loses nothing. Every request is checked by ``gateway_auth.RequestVerifier`` before its body is read, the body
against the digest it signed, and every answer is signed for the request it answers. The gateway never unpickles
a request: a call's payload goes to the Ray worker as it came (``worker.open_envelope``).

    python -m airflow_ray_provider.cluster.gateway --host 127.0.0.1 --port 8275   # key in AIRFLOW_RAY_GATEWAY_KEY

starts it from a driver on the cluster (a Ray job's entrypoint) and stays as that job's driver, like the keeper.

This module runs inside the Ray cluster and must not import Airflow.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from aiohttp import web
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from airflow_ray_provider import __version__
from airflow_ray_provider.cluster import gateway_api as api
from airflow_ray_provider.cluster import owner as owner_mod
from airflow_ray_provider.cluster import worker
from airflow_ray_provider.cluster.gateway_auth import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    RequestVerifier,
    sign_response,
)
from airflow_ray_provider.cluster.shipped import with_shipped_code
from airflow_ray_provider.exceptions import GatewayAuthError, GatewayRequestError

GATEWAY_NAME = "airflow-ray-gateway"
KEY_ENV = api.KEY_ENV
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
# An owner actor answers from memory in milliseconds; a minute also covers it being restarted on a loaded head.
OWNER_CALL_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30.0
# A split unpickles the whole value in a Ray task and stores each item: minutes for gigabytes.
SPLIT_TIMEOUT_S = 600.0
# A value up to this size (Ray keeps it inline in the task's reply) is pickled by the gateway itself.
INLINE_VALUE_BYTES = 100 * 1024

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class GatewayConfig:
    """Where and how the gateway listens. ``key``: ``gateway_auth.derive_key`` of the deployment's secret."""

    key: bytes
    host: str = "127.0.0.1"  # loopback unless a deployment says otherwise
    port: int = 0  # 0: any free port (the embedded head; ``GatewayActor.address`` tells which)
    certfile: str | None = None
    keyfile: str | None = None
    max_body_bytes: int = api.MAX_BODY_BYTES
    max_concurrent: int = api.MAX_CONCURRENT
    read_timeout_s: float = api.READ_TIMEOUT_S

    def __post_init__(self) -> None:
        if len(self.key) < 32:
            raise ValueError("the gateway's key must be 32 bytes (gateway_auth.derive_key)")
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("TLS needs both certfile and keyfile; only one was given")


class GatewayApp:
    """The HTTP API over the owner actors; ``app()`` builds the aiohttp application."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._verifier = RequestVerifier(config.key)
        self._owners: dict[tuple[str, int], Any] = {}
        self._active = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._guard],
                              handler_args={"max_field_size": 8190, "max_line_size": 8190})
        p = api.PREFIX
        app.router.add_get(f"{p}/version", self.version)
        app.router.add_get(f"{p}/status", self.status)
        app.router.add_get(f"{p}/openapi.json", self.openapi)
        app.router.add_post(f"{p}/calls", self.submit)
        app.router.add_get(f"{p}/calls/poll", self.poll)
        app.router.add_get(f"{p}/calls/error", self.error)
        app.router.add_post(f"{p}/calls/cancel", self.cancel)
        app.router.add_post(f"{p}/calls/lease", self.lease)
        app.router.add_get(f"{p}/objects", self.describe)
        app.router.add_get(f"{p}/objects/inventory", self.inventory)
        app.router.add_delete(f"{p}/objects", self.release)
        app.router.add_get(f"{p}/objects/value", self.value)
        app.router.add_post(f"{p}/objects/split", self.split)
        return app

    # -- the guard every request passes ------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._active >= self.config.max_concurrent:
            return _json(503, {"error": f"the gateway is answering {self._active} requests; try again"})
        self._active += 1
        try:
            return await self._checked(request, handler)
        finally:
            self._active -= 1

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        url = request.rel_url
        try:
            signed = self._verifier.verify_headers(request.method, url.raw_path, url.raw_query_string,
                                                   request.headers)
        except GatewayAuthError as exc:  # unsigned: nothing is read, and the answer carries no signature
            return _json(401, {"error": str(exc)})
        nonce = request.headers[HEADER_NONCE]
        try:
            if (request.content_length or 0) > self.config.max_body_bytes:
                raise GatewayRequestError(f"the body has {request.content_length} bytes; the gateway takes at most "
                                          f"{self.config.max_body_bytes}", 413)
            try:
                body = await asyncio.wait_for(request.read(), self.config.read_timeout_s)
            except asyncio.TimeoutError:
                raise GatewayRequestError(f"the body did not arrive within {self.config.read_timeout_s:g} s",
                                          408) from None
            except web.HTTPRequestEntityTooLarge:
                raise GatewayRequestError(f"the body is over the gateway's {self.config.max_body_bytes} bytes",
                                          413) from None
            self._verifier.check_body(url.raw_path, signed, body)
            response = await handler(request)
        except GatewayAuthError as exc:
            response = _json(401, {"error": str(exc)})
        except GatewayRequestError as exc:
            response = _json(exc.status, {"error": str(exc)})
        except web.HTTPException as exc:  # aiohttp's own (405, 404 of the router)
            response = _json(exc.status, {"error": exc.reason})
        except Exception as exc:  # answered, and logged with its traceback here
            log.exception("Gateway: %s %s failed", request.method, url.raw_path)
            response = _json(500, {"error": f"{type(exc).__name__}: {exc}"})
        if type(response) is not web.StreamResponse:  # a streamed answer signs its own trailer
            response.headers[HEADER_SIGNATURE] = sign_response(self.config.key, nonce, response.status,
                                                               bytes(response.body or b""))
        return response

    # -- owners ------------------------------------------------------------------------------------------
    async def _owner(self, namespace: str, shard: int) -> Any:
        found = self._owners.get((namespace, shard))
        if found is None:
            # get_owner may start the keeper (a blocking wait of up to a minute): not on this loop.
            found = self._owners[namespace, shard] = await asyncio.to_thread(owner_mod.get_owner, namespace, shard)
        return found

    async def _call(self, what: str, ref: Any, timeout: float = OWNER_CALL_TIMEOUT_S) -> Any:
        try:
            return await asyncio.wait_for(ref, timeout)
        except asyncio.TimeoutError:
            raise GatewayRequestError(f"no answer from {what} within {timeout:g} s", 504) from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if isinstance(cause, KeyError):
                raise GatewayRequestError(str(cause.args[0]), 409 if "already in use" in str(cause) else 404) from None
            if isinstance(cause, (ValueError, TypeError)):  # e.g. Ray refusing a task option the client sent
                raise GatewayRequestError(f"{what}: {type(cause).__name__}: {cause}") from None
            raise

    def _run_of(self, request: web.Request) -> tuple[str, int, str]:
        query = request.rel_url.query
        return (api.check_namespace(query.get("namespace")), api.check_shard(query.get("shard")),
                api.check_key(query.get("key")))

    # -- handlers ----------------------------------------------------------------------------------------
    async def version(self, request: web.Request) -> web.Response:
        return _json(200, version_info())

    async def status(self, request: web.Request) -> web.Response:
        def read() -> dict[str, Any]:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            return {"ray": ray.__version__, "nodes": len(nodes), "resources": ray.cluster_resources(),
                    "available": ray.available_resources(), "node_resources": [n.get("Resources", {})
                                                                               for n in nodes]}

        return _json(200, await asyncio.to_thread(read))

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")

    async def submit(self, request: web.Request) -> web.Response:
        try:
            call = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise GatewayRequestError(f"the body is not JSON: {exc}") from None
        if not isinstance(call, dict):
            raise GatewayRequestError("the body must be a JSON object (CallRequest)")
        key, namespace = api.check_key(call.get("key")), api.check_namespace(call.get("namespace"))
        shard = api.check_shard(call.get("shard"))
        lease_s, hold_s = api.check_seconds(call.get("lease_s"), "lease_s"), api.check_seconds(call.get("hold_s", 0),
                                                                                              "hold_s")
        options = call.get("options") or {}
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise GatewayRequestError("options must be a JSON object of Ray task options")
        try:
            payload = base64.b64decode(str(call.get("payload") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise GatewayRequestError("payload must be base64 (the cloudpickled callable and arguments)") from None
        if not payload:
            raise GatewayRequestError("payload is empty")
        inputs = call.get("inputs") or []
        if not isinstance(inputs, list):
            raise GatewayRequestError("inputs must be a list of {namespace, shard, key}")
        if isinstance(options.get("runtime_env"), dict):  # its own py_modules must not drop the provider's
            options["runtime_env"] = with_shipped_code(options["runtime_env"])
        refs = await self._held(inputs)
        owner = await self._owner(namespace, shard)
        # By value, not ray.put: an object put here would belong to the gateway and die with it mid-run.
        envelope = api.CallEnvelope(payload, refs)
        task = await self._call(f"owner shard {shard} submitting {key!r}",
                                owner.submit.remote(key, [envelope], options, lease_s, hold_s))
        return _json(201, {"key": key, "task": task})

    async def _held(self, inputs: list[Any]) -> list[Any]:
        """The refs of a call's upstream inputs, in order, from their owners; 409 naming any that is gone."""
        wanted: list[tuple[str, int, str]] = []
        for i, item in enumerate(inputs):
            if not isinstance(item, dict):
                raise GatewayRequestError(f"inputs[{i}] must be an object {{namespace, shard, key}}")
            wanted.append((api.check_namespace(item.get("namespace"), f"inputs[{i}].namespace"),
                           api.check_shard(item.get("shard"), f"inputs[{i}].shard"),
                           api.check_key(item.get("key"), f"inputs[{i}].key")))
        refs: list[Any] = [None] * len(wanted)
        by_owner: dict[tuple[str, int], list[int]] = {}
        for i, (namespace, shard, _) in enumerate(wanted):
            by_owner.setdefault((namespace, shard), []).append(i)
        for (namespace, shard), indexes in by_owner.items():
            owner = await self._owner(namespace, shard)
            found = await self._call(f"owner shard {shard} (namespace {namespace!r})",
                                     owner.get_many.remote([wanted[i][2] for i in indexes]))
            for i, ref in zip(indexes, found, strict=True):
                if ref is None:
                    raise GatewayRequestError(f"input {i} (key {wanted[i][2]!r}) is gone from Ray: its owner no "
                                              f"longer holds it (released, or the owner restarted)", 409)
                refs[i] = ref
        return refs

    async def poll(self, request: web.Request) -> web.Response:
        namespace, shard, key = self._run_of(request)
        query = request.rel_url.query
        offset = query.get("log_offset", "0")
        if not offset.isdigit():
            raise GatewayRequestError(f"log_offset must be a non-negative integer; got {offset[:40]!r}")
        wait = api.check_seconds(query.get("wait", "0"), "wait", maximum=api.MAX_POLL_WAIT_S)
        owner = await self._owner(namespace, shard)
        status = await self._call(f"owner shard {shard} polling {key!r}", owner.poll.remote(key, int(offset), wait),
                                  OWNER_CALL_TIMEOUT_S + wait)
        return _json(200, status)

    async def cancel(self, request: web.Request) -> web.Response:
        namespace, shard, key = self._run_of(request)
        owner = await self._owner(namespace, shard)
        return _json(200, {"cancelled": await self._call(f"owner shard {shard} cancelling {key!r}",
                                                         owner.cancel.remote(key))})

    async def lease(self, request: web.Request) -> web.Response:
        namespace, shard, key = self._run_of(request)
        query = request.rel_url.query
        lease_s = api.check_seconds(query.get("lease_s"), "lease_s")
        hold_s = api.check_seconds(query.get("hold_s", "0"), "hold_s")
        owner = await self._owner(namespace, shard)
        return _json(200, {"held": await self._call(f"owner shard {shard} renewing {key!r}",
                                                    owner.set_lease.remote(key, lease_s, hold_s))})

    async def describe(self, request: web.Request) -> web.Response:
        namespace, shard, key = self._run_of(request)
        owner = await self._owner(namespace, shard)
        return _json(200, await self._call(f"owner shard {shard} describing {key!r}", owner.describe.remote(key)))

    async def inventory(self, request: web.Request) -> web.Response:
        """Every key one owner holds, with its state, finish time, size and hold: what gc and the Ray tab read."""
        query = request.rel_url.query
        namespace, shard = api.check_namespace(query.get("namespace")), api.check_shard(query.get("shard"))
        owner = await self._owner(namespace, shard)
        return _json(200, await self._call(f"owner shard {shard} listing its keys", owner.inventory.remote()))

    async def release(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        namespace, shard = api.check_namespace(query.get("namespace")), api.check_shard(query.get("shard"))
        keys = [api.check_key(k) for k in query.getall("key", [])]
        owner = await self._owner(namespace, shard)
        return _json(200, {"released": await self._call(f"owner shard {shard} releasing {len(keys)} key(s)",
                                                        owner.release.remote(keys))})

    async def split(self, request: web.Request) -> web.Response:
        """Replace a finished list or dict object by one object per item (keys ``key#i``): what a mapped task or
        one of ``multiple_outputs`` reads alone. Body: ``{"names": [...]}`` for a dict's keys, or ``{}``."""
        namespace, shard, key = self._run_of(request)
        try:
            body = json.loads(await request.read() or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise GatewayRequestError(f"the body is not JSON: {exc}") from None
        names = body.get("names") if isinstance(body, dict) else None
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise GatewayRequestError("names must be a list of strings (a dict's keys, in order) or absent")
        owner = await self._owner(namespace, shard)
        return _json(200, await self._call(f"owner shard {shard} splitting {key!r}", owner.split.remote(key, names),
                                           SPLIT_TIMEOUT_S))

    async def value(self, request: web.Request) -> web.StreamResponse:
        """The value's pickle, streamed a frame at a time, then its signed trailer (gateway_api)."""
        return await self._send_pickle(request, "finished")

    async def error(self, request: web.Request) -> web.StreamResponse:
        """A failed call's exception, pickled and sent as a value is: the Airflow side re-raises an Airflow skip or
        fail raised inside Ray as such, and keeps any other as the failure's cause."""
        return await self._send_pickle(request, "failed")

    async def _send_pickle(self, request: web.Request, state: str) -> web.StreamResponse:
        namespace, shard, key = self._run_of(request)
        owner = await self._owner(namespace, shard)
        described = await self._call(f"owner shard {shard} describing {key!r}", owner.describe.remote(key))
        if described["state"] != state:
            what = "value" if state == "finished" else "exception"
            raise GatewayRequestError(f"{key!r} {described['state']}: it has no {what} "
                                      f"({described.get('error') or ''})", 409)
        (ref,) = await self._call(f"owner shard {shard} handing out {key!r}", owner.get.remote(key))
        frames = await self._frames(ref, key, described, state)
        first = await anext(frames)  # an error surfaces here, before anything is sent
        nonce = request.headers[HEADER_NONCE]
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        digest = hashlib.sha256()
        try:
            digest.update(first)
            await response.write(first)
            async for frame in frames:
                digest.update(frame)
                await response.write(frame)
        except Exception:
            # The status is sent: the only way left to say "failed" is to end the stream without its trailer and
            # its last chunk, which the client reports as an incomplete answer (and unpickles nothing).
            log.exception("Gateway: streaming the value of %r failed midway", key)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write(sign_response(self.config.key, nonce, 200, digest.hexdigest()).encode())
        await response.write_eof()
        return response

    async def _frames(self, ref: Any, key: str, described: dict[str, Any], state: str) -> AsyncIterator[bytes]:
        """The pickle's frames: a failure's exception, or a small value, pickled here (no Ray task to schedule: a
        fan-out of small results is most of the traffic); a large one by a task on the node that holds it."""
        if state == "failed":
            data = await asyncio.to_thread(worker.failure_of, [ref])
            return _one(data)
        size = described.get("size")
        if isinstance(size, int) and size <= INLINE_VALUE_BYTES:
            try:
                return _one(worker.pickled(await ref))
            except Exception as exc:  # noqa: BLE001 - e.g. its classes load only in the task's runtime_env
                log.info("Gateway: the value of %r is read by a Ray task instead (%s)", key, exc)
        strategy = (NodeAffinitySchedulingStrategy(described["node_ids"][0], soft=True)
                    if described.get("node_ids") else "DEFAULT")
        refs = worker.value_frames.options(scheduling_strategy=strategy, name=f"value:{key}").remote(
            [ref], api.FRAME_BYTES)

        async def relay() -> AsyncIterator[bytes]:
            while (frame := await self._frame(refs, key)) is not None:
                yield frame

        return relay()

    async def _frame(self, frames: Any, key: str) -> bytes | None:
        try:
            ref = await frames.__anext__()
        except StopAsyncIteration:
            return None
        try:
            return await ref
        except ray.exceptions.RayTaskError as exc:
            raise GatewayRequestError(f"the value of {key!r} could not be read: {exc}", 409) from None


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def version_info() -> dict[str, Any]:
    """What a client compares before it sends a pickle: the provider, Ray and Python (a callable pickled by value
    loads only in the same Python minor version)."""
    return {"api": api.API_VERSION, "provider": __version__, "ray": ray.__version__,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def _json(status: int, data: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(data, default=str).encode(), content_type="application/json")


class GatewayActor:
    """Serves ``GatewayApp`` from a thread with its own event loop, started by the constructor, so a gateway Ray
    restarts (``max_restarts=-1``) serves again without anyone calling it."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        self._bound: tuple[str, int] | None = None
        self._failed: BaseException | None = None
        started = threading.Event()
        threading.Thread(target=self._serve, args=(started,), daemon=True, name="airflow-ray-gateway").start()
        if not started.wait(START_TIMEOUT_S):
            raise TimeoutError(f"the gateway did not start listening within {START_TIMEOUT_S:g} s")
        if self._failed is not None:
            raise RuntimeError(f"the gateway could not listen on {config.host}:{config.port}: {self._failed}")

    def _serve(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        try:
            self._bound = loop.run_until_complete(self._start())
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            self._failed = exc
            started.set()
            return
        started.set()
        loop.run_forever()

    async def _start(self) -> tuple[str, int]:
        config = self._config
        runner = web.AppRunner(GatewayApp(config).app(), keepalive_timeout=api.KEEPALIVE_S, access_log=None,
                               handler_cancellation=True)
        await runner.setup()
        context = None
        if config.certfile:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(config.certfile, config.keyfile)
        site = web.TCPSite(runner, config.host, config.port, ssl_context=context, backlog=512)
        await site.start()
        host, port = runner.addresses[0][:2]  # the bound socket's: port 0 means any free one
        log.info("Airflow-Ray gateway listening on %s:%d (%s)", host, port, "TLS" if context else "plain HTTP")
        return host, port

    def address(self) -> tuple[str, int, bool]:
        """Where it listens: host, port, and whether it speaks TLS."""
        assert self._bound is not None
        return (*self._bound, bool(self._config.certfile))

    def version(self) -> dict[str, Any]:
        """What ``/v1/version`` answers: a new gateway job compares it before it keeps this actor."""
        return version_info()


def ensure_gateway(config: GatewayConfig, *, namespace: str = owner_mod.SYSTEM_NAMESPACE,
                   timeout: float = 120.0) -> tuple[str, int, bool]:
    """Start the gateway on the head node, or find the one running; where it listens. Needs ``ray.init``.

    A running gateway is kept as it is: its address tells the caller where it is (a different port or host than
    asked means an earlier configuration, which ``stop_gateway`` ends)."""
    handle = ray.remote(GatewayActor).options(
        name=GATEWAY_NAME, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
        resources=owner_mod.ON_HEAD_NODE, max_restarts=-1, max_concurrency=4,
    ).remote(config)
    return tuple(ray.get(handle.address.remote(), timeout=timeout))  # type: ignore[return-value]


def stop_gateway(namespace: str = owner_mod.SYSTEM_NAMESPACE) -> bool:
    """End the gateway (``ray.kill``, no restart); False if none ran."""
    try:
        handle = ray.get_actor(GATEWAY_NAME, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


def _replace_other_version(namespace: str = owner_mod.SYSTEM_NAMESPACE) -> None:
    """End a running gateway of another provider version (or one too old to say), so this job starts its own."""
    try:
        running = ray.get_actor(GATEWAY_NAME, namespace=namespace)
    except ValueError:
        return
    try:
        theirs = ray.get(running.version.remote(), timeout=START_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - an actor without version() is older than this check: replaced
        theirs = {"error": repr(exc)}
    if theirs != version_info():
        print(f"replacing the running gateway {theirs} with {version_info()}", flush=True)
        stop_gateway(namespace)


def main(argv: list[str]) -> int:
    """The entrypoint of the gateway's Ray job: start it, then stay as the job's driver (see keeper.py)."""
    parser = argparse.ArgumentParser(prog="python -m airflow_ray_provider.cluster.gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args(argv)
    key_hex = os.environ.get(KEY_ENV, "")
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        key = b""
    if len(key) < 32:
        print(f"{KEY_ENV} must hold the gateway key's hex (64 characters)", file=sys.stderr)
        return 2
    ray.init(address="auto", namespace=owner_mod.SYSTEM_NAMESPACE, log_to_driver=False, configure_logging=False)
    _replace_other_version()
    host, port, tls = ensure_gateway(GatewayConfig(key, args.host, args.port, args.certfile, args.keyfile))
    print(f"gateway listening on {'https' if tls else 'http'}://{host}:{port}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
