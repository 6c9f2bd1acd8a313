"""What the gateway and its client share: the API's paths, limits and the shapes that cross it (issue 24; design:
docs/design/gateway.md). Imports neither Ray nor Airflow: the client runs where Ray is not installed.

A call is submitted as JSON (``CallRequest``) whose ``payload`` is the base64 of a cloudpickled
``(callable bytes, args, kwargs[, checkpoint job])``. Upstream results the cluster holds never cross the gateway:
the client puts a ``HeldInput`` placeholder where one goes and names it in ``inputs``; the gateway looks the keys up
in their owner actors and hands the refs over beside the payload (``CallEnvelope``), without unpickling it; the Ray
worker swaps each placeholder for its value (``worker.open_envelope``).

A result's value is streamed as its pickle followed by ``TRAILER_BYTES`` of signature over the SHA-256 of all that
came before it (``gateway_auth.sign_response`` with that digest): the client unpickles only what the deployment's
gateway sent, and neither side holds more than a frame of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from airflow_ray_provider.exceptions import GatewayRequestError

API_VERSION = "v1"
PREFIX = f"/{API_VERSION}"
# The gateway's port on a remote head when its URL names none: beside the dashboard's 8265.
DEFAULT_PORT = 8270
# The environment variable the gateway's Ray job gets its key in (hex of gateway_auth.derive_key): the key only,
# never [ray] secret_key, because Ray's Jobs API shows a job's env_vars to anyone holding the dashboard's token.
KEY_ENV = "AIRFLOW_RAY_GATEWAY_KEY"
# A call's JSON (the pickled callable and its small arguments: large inputs go by key). aiohttp's default is 1 MiB.
MAX_BODY_BYTES = 64 * 1024 * 1024
# How long a client may take to send its body, and how long an idle connection is kept open.
READ_TIMEOUT_S = 30.0
KEEPALIVE_S = 15.0
# Requests handled at once; more get 503 at once rather than queueing without bound.
MAX_CONCURRENT = 256
# The longest a poll may wait inside the gateway for news.
MAX_POLL_WAIT_S = 30.0
FRAME_BYTES = 4 * 1024 * 1024
TRAILER_BYTES = 3 + 64  # "v1=" and the hex HMAC: gateway_auth.sign_response
# Keys name runs the way the operator makes them: dag/run/task/map/try/hex, items "#i". Conservative on purpose.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:@+=#/-]{1,512}")
NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MAX_SHARD = 1024


class HeldInputRequest(TypedDict):
    """An upstream result the cluster holds, named for the gateway to look up."""

    namespace: str
    shard: int
    key: str


class CallRequest(TypedDict):
    """The body of ``POST /v1/calls``."""

    key: str
    namespace: str
    shard: int
    options: dict[str, Any]
    lease_s: float
    hold_s: float
    payload: str  # base64 of the cloudpickled (callable bytes, args, kwargs[, job])
    inputs: list[HeldInputRequest]


@dataclass(frozen=True)
class HeldInput:
    """Where the ``index``-th of a call's ``inputs`` goes in its arguments; ``label`` names it in errors and
    ``checkpoint`` (as ``worker.UpstreamRef`` takes it) lets the worker restore it if the store lost it."""

    index: int
    label: str
    checkpoint: Any = None


@dataclass(frozen=True)
class CallEnvelope:
    """What the gateway hands the owner actor for a call: the payload still pickled, and the refs of its inputs
    (a list, so Ray passes them on unresolved)."""

    payload: bytes
    inputs: list[Any]


def check_key(key: Any, field: str = "key") -> str:
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise GatewayRequestError(f"{field} must be 1-512 characters of letters, digits and _.:@+=#/-; "
                                  f"got {str(key)[:80]!r}")
    return key


def check_namespace(namespace: Any, field: str = "namespace") -> str:
    if not isinstance(namespace, str) or not NAMESPACE_PATTERN.fullmatch(namespace):
        raise GatewayRequestError(f"{field} must be 1-128 characters of letters, digits and _.-; "
                                  f"got {str(namespace)[:80]!r}")
    return namespace


def check_shard(shard: Any, field: str = "shard") -> int:
    if isinstance(shard, str) and shard.isdigit():
        shard = int(shard)
    if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < MAX_SHARD:
        raise GatewayRequestError(f"{field} must be an integer from 0 to {MAX_SHARD - 1}; got {str(shard)[:40]!r}")
    return shard


def check_seconds(value: Any, field: str, *, maximum: float = 10 * 365 * 86400.0) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise GatewayRequestError(f"{field} must be a number of seconds; got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= maximum:
        raise GatewayRequestError(f"{field} must be a number of seconds from 0 to {maximum:g}; got {str(value)[:40]!r}")
    return float(value)


def map_nested(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``leaf`` applied to everything nested in its lists, tuples and dicts (their shape kept): how
    upstream results are found and swapped in a call's arguments, on either side of the gateway."""
    if isinstance(value, list):
        return [map_nested(v, leaf) for v in value]
    if isinstance(value, tuple):
        return tuple(map_nested(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: map_nested(v, leaf) for k, v in value.items()}
    return leaf(value)
