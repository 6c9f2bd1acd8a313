"""The gateway's request and answer signatures (cluster/gateway_auth.py): what is accepted, and that every
alteration, replay, stale time and other deployment's key is refused, naming the check that failed."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_ray_provider.cluster.gateway_auth import (
    HEADER_BODY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    WINDOW_S,
    RequestVerifier,
    SignedRequest,
    body_digest,
    canonical_query,
    derive_key,
    sign_request,
    sign_response,
    verify_response,
)
from airflow_ray_provider.exceptions import GatewayAuthError, SigningError

SECRET = b"s" * 32
KEY = derive_key(SECRET)
NOW = 1_800_000_000.0
BODY = b'{"callable": "..."}'


def _request(**changes: object) -> tuple[dict[str, str], dict[str, object]]:
    """Headers signed for a POST, and the request's parts as the gateway sees them (``changes`` alter the latter)."""
    headers = sign_request(KEY, "POST", "/v1/runs/a%2Fb/submit", "wait=1&after=0", BODY, now=NOW)
    seen = {"method": "POST", "path": "/v1/runs/a%2Fb/submit", "query": "wait=1&after=0", "headers": headers,
            **changes}
    return headers, seen


def test_a_signed_request_is_accepted_and_its_body_checked() -> None:
    verifier = RequestVerifier(KEY)
    headers, seen = _request(query="after=0&wait=1")  # the same pairs in another order sign the same
    digest = verifier.verify_headers(**seen, now=NOW + 5)  # type: ignore[arg-type]
    assert digest == body_digest(BODY) == headers[HEADER_BODY]
    verifier.check_body("/v1/runs", digest, BODY)
    verifier.check_body("/v1/runs", digest, body_digest(BODY))  # a streamed body, by its digest
    with pytest.raises(GatewayAuthError, match="is not the one that was signed"):
        verifier.check_body("/v1/runs", digest, BODY + b" ")


def test_header_names_are_case_insensitive() -> None:
    headers, seen = _request()
    seen["headers"] = {name.lower(): value for name, value in headers.items()}
    RequestVerifier(KEY).verify_headers(**seen, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize(("change", "message"), [
    ({"method": "PUT"}, "not signed with this deployment's key"),
    ({"path": "/v1/runs/a%2Fc/submit"}, "not signed with this deployment's key"),
    ({"path": "/v1/runs/a/b/submit"}, "not signed with this deployment's key"),  # the raw path, not its decoding
    ({"query": "wait=1&after=1"}, "not signed with this deployment's key"),
    ({"query": "wait=1"}, "not signed with this deployment's key"),
])
def test_an_altered_request_is_refused(change: dict[str, object], message: str) -> None:
    _, seen = _request(**change)
    with pytest.raises(GatewayAuthError, match=message):
        RequestVerifier(KEY).verify_headers(**seen, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("header", [HEADER_TIME, HEADER_NONCE, HEADER_BODY])
def test_an_altered_header_is_refused(header: str) -> None:
    headers, seen = _request()
    seen["headers"] = {**headers, header: headers[header][:-1] + ("0" if headers[header][-1] != "0" else "1")}
    with pytest.raises(GatewayAuthError, match="not signed with this deployment's key"):
        RequestVerifier(KEY).verify_headers(**seen, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("header", [HEADER_TIME, HEADER_NONCE, HEADER_BODY, HEADER_SIGNATURE])
def test_a_missing_header_is_named(header: str) -> None:
    headers, seen = _request()
    seen["headers"] = {name: value for name, value in headers.items() if name != header}
    with pytest.raises(GatewayAuthError, match=f"lacks the header\\(s\\) {header}"):
        RequestVerifier(KEY).verify_headers(**seen, now=NOW)  # type: ignore[arg-type]


def test_another_deployments_key_is_refused_and_the_key_is_not_the_secret() -> None:
    other = derive_key(b"t" * 32)
    headers = sign_request(other, "POST", "/v1/runs", "", BODY, now=NOW)
    with pytest.raises(GatewayAuthError, match="not signed with this deployment's key"):
        RequestVerifier(KEY).verify_headers("POST", "/v1/runs", "", headers, now=NOW)
    assert KEY != SECRET and len(KEY) == 32  # the gateway's job is given the derived key, never the secret
    with pytest.raises(SigningError, match="at least 32"):
        derive_key(b"short")


@pytest.mark.parametrize("offset", [WINDOW_S + 1, -(WINDOW_S + 1)])
def test_a_request_outside_the_window_is_refused(offset: float) -> None:
    _, seen = _request()
    with pytest.raises(GatewayAuthError, match="outside the 60 s window"):
        RequestVerifier(KEY).verify_headers(**seen, now=NOW + offset)  # type: ignore[arg-type]


def test_a_replayed_request_is_refused_for_as_long_as_its_time_is_inside_the_window() -> None:
    verifier = RequestVerifier(KEY)
    _, seen = _request()
    verifier.verify_headers(**seen, now=NOW - WINDOW_S)  # type: ignore[arg-type]  # first seen early
    for later in (NOW - WINDOW_S + 1, NOW, NOW + WINDOW_S):  # its time stays inside the window until NOW + 60
        with pytest.raises(GatewayAuthError, match="reuses a nonce"):
            verifier.verify_headers(**seen, now=later)  # type: ignore[arg-type]
    fresh_headers = sign_request(KEY, "POST", "/v1/runs", "", BODY, now=NOW + 3 * WINDOW_S)
    verifier.verify_headers("POST", "/v1/runs", "", fresh_headers, now=NOW + 3 * WINDOW_S)
    assert len(verifier._seen) == 1  # the expired nonce was forgotten


def test_a_full_nonce_cache_refuses_instead_of_forgetting() -> None:
    verifier = RequestVerifier(KEY, max_nonces=2)
    for n in range(2):
        verifier.verify_headers("GET", "/v1/status", "", sign_request(KEY, "GET", "/v1/status", now=NOW), now=NOW)
        assert len(verifier._seen) == n + 1
    with pytest.raises(GatewayAuthError, match="refuses more until some expire"):
        verifier.verify_headers("GET", "/v1/status", "", sign_request(KEY, "GET", "/v1/status", now=NOW), now=NOW)


@pytest.mark.parametrize("timestamp", ["nan", "inf", "-inf", "soon"])
def test_a_malformed_time_is_refused_even_when_signed(timestamp: str) -> None:
    request = SignedRequest("GET", "/v1/status", "", body_digest(b""), timestamp, "n" * 32)
    headers = {HEADER_TIME: timestamp, HEADER_NONCE: request.nonce, HEADER_BODY: request.body_sha256,
               HEADER_SIGNATURE: request.mac(KEY)}
    with pytest.raises(GatewayAuthError, match=r"malformed time|outside the 60 s window"):
        RequestVerifier(KEY).verify_headers("GET", "/v1/status", "", headers, now=NOW)


def test_an_answer_is_bound_to_its_request_status_and_body() -> None:
    signature = sign_response(KEY, "nonce-1", 200, b"result")
    verify_response(KEY, "nonce-1", 200, b"result", signature)
    verify_response(KEY, "nonce-1", 200, body_digest(b"result"), signature)  # streamed: by its digest
    other = derive_key(b"t" * 32)
    for nonce, status, body, key in (("nonce-2", 200, b"result", KEY), ("nonce-1", 201, b"result", KEY),
                                     ("nonce-1", 200, b"resulT", KEY), ("nonce-1", 200, b"result", other)):
        with pytest.raises(GatewayAuthError, match="not signed with this deployment's key"):
            verify_response(key, nonce, status, body, signature)
    with pytest.raises(GatewayAuthError):
        verify_response(KEY, "nonce-1", 200, b"result", None)


@given(field=st.sampled_from([f.name for f in dataclasses.fields(SignedRequest)]), value=st.text(max_size=40))
def test_any_change_to_a_signed_part_changes_the_signature(field: str, value: str) -> None:
    """Equal signatures exactly when the parts are equal as signed (the method's case and the query's pair order
    and empty pairs are not part of a request's meaning)."""
    request = SignedRequest("POST", "/v1/runs", "a=1&b=", body_digest(BODY), "1800000000.000", "n" * 32)
    changed = dataclasses.replace(request, **{field: value})
    as_signed = {"method": str.upper, "query": canonical_query}.get(field, lambda part: part)
    same = as_signed(getattr(changed, field)) == as_signed(getattr(request, field))
    assert (changed.mac(KEY) == request.mac(KEY)) == same
