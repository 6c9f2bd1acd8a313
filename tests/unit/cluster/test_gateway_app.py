"""What the gateway refuses before it reaches any owner actor, served for real (aiohttp, its own thread, as in its
Ray actor) without a cluster: unsigned, malformed, oversized and slow requests. And what the client refuses from a
gateway that does not hold the deployment's key: that gateway is a stand-in (httpx's MockTransport), since a real
one answers only with its own key. Calls that reach the owners: tests/integration/cluster/test_gateway.py.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from airflow_ray_provider.cluster.gateway import OPENAPI_PATH, GatewayActor, GatewayApp, GatewayConfig
from airflow_ray_provider.cluster.gateway_api import TRAILER_BYTES
from airflow_ray_provider.cluster.gateway_auth import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    derive_key,
    sign_request,
    sign_response,
)
from airflow_ray_provider.exceptions import GatewayAuthError, GatewayError, RayVersionMismatch
from airflow_ray_provider.gateway_client import GatewayClient

KEY = derive_key(b"k" * 32)
LIMIT = 4096


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = GatewayActor(GatewayConfig(KEY, max_body_bytes=LIMIT, read_timeout_s=1.0))
    host, port, tls = server.address()
    assert host == "127.0.0.1" and port > 0 and not tls
    yield f"http://{host}:{port}"  # the server thread is a daemon: it ends with the test process


def _signed(http: httpx.Client, url: str, method: str, path: str, query: str = "", body: bytes = b"",
            key: bytes = KEY) -> httpx.Response:
    headers = sign_request(key, method, path, query, body)
    answer = http.request(method, f"{url}{path}" + (f"?{query}" if query else ""), content=body, headers=headers)
    if HEADER_SIGNATURE in answer.headers:  # every answer to a signed request is signed for it
        assert answer.headers[HEADER_SIGNATURE] == sign_response(KEY, headers[HEADER_NONCE], answer.status_code,
                                                                 answer.content)
    return answer


def test_requests_not_signed_with_the_key_get_401_and_no_signature(url: str) -> None:
    with httpx.Client() as http:
        refused = [
            http.get(f"{url}/v1/version"),  # unsigned
            _signed(http, url, "GET", "/v1/version", key=derive_key(b"x" * 32)),  # another deployment's key
            # signed without the query it was sent with
            http.get(f"{url}/v1/version?extra=1", headers=sign_request(KEY, "GET", "/v1/version")),
        ]
        for answer in refused:
            assert answer.status_code == 401 and HEADER_SIGNATURE not in answer.headers, answer.text
        assert _signed(http, url, "GET", "/v1/version").status_code == 200


@pytest.mark.parametrize(("method", "path", "query", "body", "status", "names"), [
    ("GET", "/v1/calls/poll", "namespace=tests&shard=0&key=bad%20key", b"", 400, "key must be"),
    ("GET", "/v1/calls/poll", "namespace=tests&shard=-1&key=k", b"", 400, "shard must be"),
    ("GET", "/v1/calls/poll", "namespace=tests&shard=0&key=k&wait=31", b"", 400, "wait must be"),
    ("GET", "/v1/calls/poll", "namespace=tests&shard=0&key=k&log_offset=x", b"", 400, "log_offset must be"),
    ("GET", "/v1/objects", "namespace=a%2Fb&shard=0&key=k", b"", 400, "namespace must be"),
    ("POST", "/v1/calls", "", b"{not json", 400, "not JSON"),
    ("POST", "/v1/calls", "", b"[1]", 400, "JSON object"),
    ("POST", "/v1/calls", "", json.dumps({"key": "k", "namespace": "n", "shard": 0, "lease_s": 60,
                                          "payload": "***"}).encode(), 400, "payload must be base64"),
    ("POST", "/v1/calls", "", json.dumps({"key": "k", "namespace": "n", "shard": 0, "lease_s": -1,
                                          "payload": "AA=="}).encode(), 400, "lease_s must be"),
    ("POST", "/v1/calls", "", json.dumps({"key": "k", "namespace": "n", "shard": 0, "lease_s": 1,
                                          "payload": "AA==", "inputs": [{"key": "k"}]}).encode(), 400,
     "inputs[0].namespace"),
    ("POST", "/v1/calls", "", b"x" * (LIMIT + 1), 413, "at most 4096"),
    ("GET", "/v1/nothing", "", b"", 404, "Not Found"),
    ("PUT", "/v1/calls", "", b"", 405, "Method Not Allowed"),
])
def test_a_malformed_request_is_refused_naming_what_was_wrong(url: str, method: str, path: str, query: str,
                                                             body: bytes, status: int, names: str) -> None:
    with httpx.Client() as http:
        answer = _signed(http, url, method, path, query, body)
    assert answer.status_code == status and names in answer.json()["error"], answer.text
    assert HEADER_SIGNATURE in answer.headers


def test_a_client_that_stalls_its_body_is_cut_off(url: str) -> None:
    """Headers signed and sent, then 10 of 100 body bytes: 408 after the read timeout (1 s here), not a held slot."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    headers = sign_request(KEY, "POST", "/v1/calls", body=b"y" * 100)
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(("POST /v1/calls HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                      + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + b"y" * 10)
        started = time.monotonic()
        answer = sock.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer, answer
    assert time.monotonic() - started < 20


def _client_of(handler: httpx.MockTransport) -> GatewayClient:
    client = GatewayClient("http://gateway.invalid:8275", KEY)
    client._http = httpx.Client(transport=handler)
    return client


def test_the_client_refuses_an_answer_the_deployment_s_gateway_did_not_sign() -> None:
    def spoofed(request: httpx.Request) -> httpx.Response:
        body = json.dumps({"api": "v1"}).encode()
        return httpx.Response(200, content=body, headers={
            HEADER_SIGNATURE: sign_response(derive_key(b"z" * 32), request.headers[HEADER_NONCE], 200, body)})

    def replayed(request: httpx.Request) -> httpx.Response:  # a genuine answer, but to another request
        body = json.dumps({"api": "v1"}).encode()
        return httpx.Response(200, content=body, headers={HEADER_SIGNATURE: sign_response(KEY, "0" * 32, 200, body)})

    for transport in (spoofed, replayed):
        with pytest.raises(GatewayAuthError, match="not signed with this deployment's key"):
            _client_of(httpx.MockTransport(transport)).version()


def test_the_client_unpickles_a_value_only_when_its_trailer_matches() -> None:
    data = pickle.dumps({"rows": 3}, protocol=5)
    ran = []

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return ran.append, ("unpickled",)

    def stream(tamper: bool) -> httpx.MockTransport:
        def answer(request: httpx.Request) -> httpx.Response:
            trailer = sign_response(KEY, request.headers[HEADER_NONCE], 200, hashlib.sha256(data).hexdigest())
            body = (pickle.dumps(Boom()) if tamper else data) + trailer.encode()
            assert len(trailer) == TRAILER_BYTES
            return httpx.Response(200, content=body)
        return httpx.MockTransport(answer)

    assert _client_of(stream(tamper=False)).value("k", "tests", 0) == {"rows": 3}
    with pytest.raises(GatewayAuthError):
        _client_of(stream(tamper=True)).value("k", "tests", 0)
    assert ran == []


def test_the_client_names_the_gateway_it_could_not_reach() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(GatewayError, match=rf"gateway at http://127.0.0.1:{port} did not answer GET /v1/version"):
        GatewayClient(f"http://127.0.0.1:{port}", KEY, timeout=5).version()
    with pytest.raises(ValueError, match="must be http"):
        GatewayClient("ray://head:10001", KEY)


def test_the_published_schema_lists_exactly_the_routes_served() -> None:
    routes = GatewayApp(GatewayConfig(KEY)).app().router.routes()
    served = {(route.method.lower(), route.resource.canonical) for route in routes if route.method != "HEAD"}
    schema = json.loads(OPENAPI_PATH.read_text())
    published = {(method, path) for path, item in schema["paths"].items() for method in item}
    assert served == published
    assert schema["openapi"].startswith("3.1") and all(op["operationId"] for item in schema["paths"].values()
                                                       for op in item.values())


def test_a_cluster_on_another_python_gets_no_pickle() -> None:
    sent: list[str] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        body = json.dumps({"api": "v1", "provider": "0.3.0", "ray": "2.60.0", "python": "3.9"}).encode()
        return httpx.Response(200, content=body, headers={
            HEADER_SIGNATURE: sign_response(KEY, request.headers[HEADER_NONCE], 200, body)})

    client = _client_of(httpx.MockTransport(gateway))
    with pytest.raises(RayVersionMismatch, match=r"runs Python 3\.9, this process 3\.\d+"):
        client.submit("k", "tests", 0, (b"fn", (), {}), {}, lease_s=60)
    assert sent == ["/v1/version"]
