"""How the gateway and its Airflow-side client prove requests and answers to each other (issue 24; design:
docs/design/gateway.md, decisions 6 and 7). The gateway itself is not built yet: this is its first part.

A request carries four headers: the time it was made, a nonce, the SHA-256 of its body, and an HMAC over the
method, the raw path, the query (its pairs sorted), the body's digest, the time and the nonce. The key is derived
from the deployment's ``[ray] secret_key`` for this purpose alone (``derive_key``), so the cluster job that runs
the gateway is given that key and never the secret, which also signs XCom references and checkpoints.

The gateway checks the headers before it reads the body (``RequestVerifier.verify_headers``): a forged, stale
(outside ``WINDOW_S`` of the gateway's clock) or replayed request (a nonce seen within the window) is refused
without reading, unpickling or running anything. Once it has read the body, it checks the digest the signature
covered (``RequestVerifier.check_body``). Each answer carries an HMAC over the request's nonce, the status and the
answer body's digest (``sign_response``), so a client never unpickles what a spoofed gateway, or a replay of an
earlier answer, hands it.

This module runs inside the Ray cluster and must not import Airflow.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from airflow_ray_provider.cluster.signing import MIN_SECRET_BYTES, canonical
from airflow_ray_provider.exceptions import GatewayAuthError, SigningError

KEY_PURPOSE = b"airflow-ray/gateway-key/v1"
REQUEST = b"airflow-ray/gateway-request/v1"
RESPONSE = b"airflow-ray/gateway-response/v1"
HEADER_TIME = "X-Airflow-Ray-Time"
HEADER_NONCE = "X-Airflow-Ray-Nonce"
HEADER_BODY = "X-Airflow-Ray-Body-SHA256"
HEADER_SIGNATURE = "X-Airflow-Ray-Signature"
SCHEME = "v1="
# How far a request's time may be from the gateway's clock, either way; nonces are remembered this long after it.
WINDOW_S = 60.0
# Nonces remembered at most: a full cache refuses new requests (retried by the client) rather than forgetting a
# nonce, which would let its request be replayed. At 60 s this is over 1,600 requests a second.
MAX_NONCES = 100_000
NONCE_BYTES = 16
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def derive_key(secret: bytes) -> bytes:
    """The gateway's key, from the deployment's secret; the gateway is given this and never the secret."""
    if len(secret) < MIN_SECRET_BYTES:
        raise SigningError(f"The signing secret has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed")
    return hmac.new(secret, KEY_PURPOSE, hashlib.sha256).digest()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical_query(query: str) -> str:
    """The query string with its pairs sorted, so that the client's and the gateway's encodings sign the same."""
    return urlencode(sorted(parse_qsl(query, keep_blank_values=True)))


@dataclass(frozen=True)
class SignedRequest:
    """What a request's signature covers."""

    method: str
    path: str
    query: str
    body_sha256: str
    timestamp: str
    nonce: str

    def mac(self, key: bytes) -> str:
        # A JSON list, not a joined string: no choice of parts can make two requests' messages equal.
        message = canonical([self.method.upper(), self.path, canonical_query(self.query), self.body_sha256,
                             self.timestamp, self.nonce])
        return SCHEME + hmac.new(key, REQUEST + b"\x00" + message, hashlib.sha256).hexdigest()


def sign_request(key: bytes, method: str, path: str, query: str = "", body: bytes = b"", *,
                 now: float | None = None, nonce: str | None = None) -> dict[str, str]:
    """The headers that prove a request to the gateway (the client side)."""
    request = SignedRequest(method, path, query, body_digest(body), f"{time.time() if now is None else now:.3f}",
                            nonce or secrets.token_hex(NONCE_BYTES))
    return {HEADER_TIME: request.timestamp, HEADER_NONCE: request.nonce, HEADER_BODY: request.body_sha256,
            HEADER_SIGNATURE: request.mac(key)}


def sign_response(key: bytes, request_nonce: str, status: int, body: bytes | str) -> str:
    """The gateway's signature of its answer to the request that carried ``request_nonce``. ``body`` is the answer
    or, for a streamed one, the SHA-256 hex digest of all of it (sent after it)."""
    digest = body if isinstance(body, str) else body_digest(body)
    message = RESPONSE + b"\x00" + canonical([request_nonce, status, digest])
    return SCHEME + hmac.new(key, message, hashlib.sha256).hexdigest()


def verify_response(key: bytes, request_nonce: str, status: int, body: bytes | str, signature: str | None) -> None:
    """Raise ``GatewayAuthError`` unless ``signature`` is the gateway's for this answer to this request."""
    if not signature or not hmac.compare_digest(sign_response(key, request_nonce, status, body).encode(),
                                                signature.encode()):
        raise GatewayAuthError(f"The gateway's answer (status {status}) is not signed with this deployment's key: "
                               "it came from another gateway or was altered; nothing of it was unpickled")


class RequestVerifier:
    """The gateway's side: checks each request's headers, then its body; remembers nonces for the window."""

    def __init__(self, key: bytes, *, window_s: float = WINDOW_S, max_nonces: int = MAX_NONCES) -> None:
        self._key = key
        self.window_s = window_s
        self.max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten, oldest first
        self._lock = threading.Lock()

    def verify_headers(self, method: str, path: str, query: str, headers: Mapping[str, str],
                       now: float | None = None) -> str:
        """Check a request's signature, time and nonce before its body is read; return the body digest it signed
        (for ``check_body``). Raise ``GatewayAuthError`` naming what was wrong (the gateway answers 401)."""
        now = time.time() if now is None else now
        fields = {name: _header(headers, name) for name in (HEADER_TIME, HEADER_NONCE, HEADER_BODY,
                                                               HEADER_SIGNATURE)}
        missing = [name for name, value in fields.items() if value is None]
        if missing:
            raise GatewayAuthError(f"The request to {path} lacks the header(s) {', '.join(missing)}: it is not "
                                   "from this deployment's Airflow")
        timestamp, nonce, digest, signature = (str(fields[name]) for name in fields)
        if len(nonce) > 128 or len(digest) != 64 or len(signature) > 128:
            raise GatewayAuthError(f"The request to {path} has a malformed authentication header")
        request = SignedRequest(method, path, query, digest, timestamp, nonce)
        if not hmac.compare_digest(request.mac(self._key).encode(), signature.encode()):
            raise GatewayAuthError(f"The request to {path} is not signed with this deployment's key (or was "
                                   "altered on the way); nothing was read or run")
        try:
            made = float(timestamp)
        except ValueError:
            raise GatewayAuthError(f"The request to {path} has a malformed time {timestamp[:40]!r}") from None
        if not abs(now - made) <= self.window_s:  # also refuses NaN
            raise GatewayAuthError(f"The request to {path} was made {now - made:+.0f} s from the gateway's clock, "
                                   f"outside the {self.window_s:.0f} s window: a replay, or the clocks disagree")
        self._remember(path, nonce, now)
        return digest

    def check_body(self, path: str, signed_digest: str, body: bytes | str) -> None:
        """Check the body read (or, streamed, the SHA-256 hex digest of all of it) against the signed digest."""
        digest = body if isinstance(body, str) else body_digest(body)
        if not hmac.compare_digest(digest.encode(), signed_digest.encode()):
            raise GatewayAuthError(f"The body of the request to {path} is not the one that was signed")

    def _remember(self, path: str, nonce: str, now: float) -> None:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                raise GatewayAuthError(f"The request to {path} reuses a nonce seen in the last "
                                       f"{self.window_s:.0f} s: a replay; refused")
            if len(self._seen) >= self.max_nonces:
                raise GatewayAuthError(f"The gateway is remembering {self.max_nonces} requests of the last "
                                       f"{self.window_s:.0f} s and refuses more until some expire; try again")
            # Kept until the latest time a request with this nonce could still be inside the window.
            self._seen[nonce] = now + 2 * self.window_s


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by name, in any case (HTTP header names are case-insensitive)."""
    if name in headers:
        return headers[name]
    lowered = name.lower()
    return next((value for key, value in headers.items() if key.lower() == lowered), None)
