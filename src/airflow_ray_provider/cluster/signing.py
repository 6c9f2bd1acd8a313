"""HMAC signatures for what the provider reads back from outside the Ray cluster.

XCom references (in the metadata DB, editable through the REST API) and checkpoint
manifests (in object storage) decide what gets fetched, restored and unpickled, so
neither is trusted until it carries a valid signature made with the deployment's
secret (``[ray] secret_key``; see :mod:`airflow_ray_provider.config`). The Ray
cluster runs user code as the user, so it is trusted: its workers get the secret to
sign the manifests they write.

Each signature is over a *purpose* and the canonical JSON of a payload, so a
signature made for one kind of record never validates another.

This module runs inside the Ray cluster and must not import Airflow.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from airflow_ray_provider.exceptions import SigningError

SCHEME = "hmac-sha256"
REFERENCE = "airflow-ray/xcom-reference/v2"
MANIFEST = "airflow-ray/checkpoint-manifest/v2"
# What a try records in the task state store so that a later try can re-attach to its Ray task (durable).
RUN_RECORD = "airflow-ray/run-record/v1"
# The Ray run a deferred task waits for, as stored in the trigger row and in the event it resumes with.
TRIGGER = "airflow-ray/trigger/v1"
MIN_SECRET_BYTES = 32


def canonical(payload: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, no NaN (which JSON cannot carry)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def sign(secret: bytes, purpose: str, payload: Any) -> str:
    if len(secret) < MIN_SECRET_BYTES:
        raise SigningError(f"The signing secret has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed")
    mac = hmac.new(secret, purpose.encode() + b"\x00" + canonical(payload), hashlib.sha256)
    return f"{SCHEME}:{mac.hexdigest()}"


def verify(secret: bytes, purpose: str, payload: Any, signature: Any) -> bool:
    """Whether ``signature`` is this deployment's for ``payload``; constant-time, never raises on bad input."""
    if not isinstance(signature, str) or len(signature) > 200:
        return False
    try:
        expected = sign(secret, purpose, payload)
    except (TypeError, ValueError):  # a payload JSON cannot encode (NaN, odd types) was never signed by us
        return False
    return hmac.compare_digest(expected.encode(), signature.encode())
