"""The ``ray`` connection's settings, parsed and validated without touching the network."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from airflow_ray_provider.exceptions import RayConnectionError

LOCAL = "local"
AUTO = "auto"
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class RayAddress:
    """One of the address forms users meet: embedded, auto, GCS ``host:port``, or Ray Client."""

    kind: str  # local | auto | gcs | client
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.kind in (LOCAL, AUTO):
            return self.kind
        prefix = "ray://" if self.kind == "client" else ""
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host  # IPv6: parse_address's form
        return f"{prefix}{host}:{self.port}"


def parse_address(raw: str) -> RayAddress:
    """Parse ``local``, ``auto``, ``host:port`` or ``ray://host:port``; raise naming the bad input."""
    text = (raw or "").strip()
    if text in ("", LOCAL):
        return RayAddress(LOCAL)
    if text == AUTO:
        return RayAddress(AUTO)
    kind = "gcs"
    if text.startswith("ray://"):
        kind, text = "client", text[len("ray://"):]
    elif "://" in text:
        raise RayConnectionError(
            f"Malformed Ray address {raw!r}: use 'local', 'auto', 'host:port' or 'ray://host:port'"
        )
    match = _HOST_PORT.match(text.rstrip("/"))
    if match is None:
        raise RayConnectionError(
            f"Malformed Ray address {raw!r}: expected 'host:port' (or 'ray://host:port', 'local', 'auto')"
        )
    port = int(match["port"])
    if not 0 < port < 65536:
        raise RayConnectionError(f"Malformed Ray address {raw!r}: port {port} is out of range")
    return RayAddress(kind, match["host"].strip("[]"), port)


def _as_dict(value: Any, name: str) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise RayConnectionError(f"Ray connection field {name!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RayConnectionError(f"Ray connection field {name!r} must be a JSON object, got {type(value).__name__}")
    return value


def _number(extra: dict[str, Any], name: str, default: float, minimum: float) -> float:
    value = extra.get(name, default)
    try:
        number = float(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise RayConnectionError(f"Ray connection field {name!r} must be a number, got {value!r}") from None
    if number < minimum:
        raise RayConnectionError(f"Ray connection field {name!r} must be at least {minimum}, got {value!r}")
    return number


@dataclass(frozen=True)
class RaySettings:
    """Everything a task needs from the ``ray`` connection."""

    address: RayAddress = field(default_factory=lambda: RayAddress(LOCAL))
    namespace: str = "airflow"
    runtime_env: dict[str, Any] = field(default_factory=dict)
    auth_token: str | None = field(default=None, repr=False)
    connect_timeout: float = 30.0
    lease_timeout: float = 60.0
    owner_shards: int = 1
    autoscaling: bool = False
    checkpoint_path: str | None = None
    checkpoint_conn_id: str | None = None
    checkpoint_storage_options: dict[str, Any] = field(default_factory=dict)
    # The Ray dashboard as the users' browsers reach it (an ingress, a port-forward): the base of each
    # task's links to its Ray task, node and logs. None: derived for the embedded head, else no links.
    dashboard_url: str | None = None
    # The cluster's gateway (docs/design/gateway.md): set, tasks reach the cluster over its HTTP API and this
    # process is no Ray driver; ``gateway_ca`` is a CA bundle to check its TLS certificate by (else the system's).
    gateway_url: str | None = None
    gateway_ca: str | None = None
    # Which connection field the address came from, so the UI's Test button can say which one won.
    address_source: str = "default"

    @classmethod
    def from_fields(
        cls,
        *,
        host: str | None = None,
        port: int | None = None,
        password: str | None = None,
        extra: dict[str, Any] | str | None = None,
    ) -> RaySettings:
        extra_d = _as_dict(extra, "extra")
        address, source = _resolve_address(extra_d.get("address"), host, port)
        namespace = str(extra_d.get("namespace") or "airflow")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,128}", namespace):
            raise RayConnectionError(f"Ray connection field 'namespace' has odd characters: {namespace!r}")
        shards = int(_number(extra_d, "owner_shards", 1, 1))
        autoscaling = extra_d.get("autoscaling", False)
        if isinstance(autoscaling, str):
            autoscaling = autoscaling.strip().lower() in ("1", "true", "yes", "on")
        checkpoint = {name: extra_d.get(name) or None
                      for name in ("checkpoint_path", "checkpoint_conn_id", "gateway_ca")}
        for name, value in checkpoint.items():
            if value is not None and not isinstance(value, str):
                raise RayConnectionError(f"Ray connection field {name!r} must be a string, got {value!r}")
        return cls(
            address=address,
            address_source=source,
            namespace=namespace,
            runtime_env=_as_dict(extra_d.get("runtime_env"), "runtime_env"),
            auth_token=password or None,
            connect_timeout=_number(extra_d, "connect_timeout", 30.0, 1.0),
            lease_timeout=_number(extra_d, "lease_timeout", 60.0, 5.0),
            owner_shards=shards,
            autoscaling=bool(autoscaling),
            checkpoint_storage_options=_as_dict(extra_d.get("checkpoint_storage_options"),
                                                "checkpoint_storage_options"),
            dashboard_url=parse_dashboard_url(extra_d.get("dashboard_url")),
            gateway_url=parse_web_url(extra_d.get("gateway_url"), "gateway_url", "http://ray-head:8270"),
            **checkpoint,
        )


def parse_dashboard_url(value: Any) -> str | None:
    """``http(s)://host[:port][/path]`` without a trailing slash, or None for empty; raise naming what is wrong.

    It becomes the start of links every UI user can click, so only a web address is taken: no other
    scheme (``javascript:``), no credentials (every viewer would see them), no query or fragment
    (the dashboard's own routes go in the fragment).
    """
    return parse_web_url(value, "dashboard_url", "http://ray-head:8265")


def parse_web_url(value: Any, name: str, example: str) -> str | None:
    """Connection field ``name``: ``http(s)://host[:port][/path]`` without a trailing slash, or None for empty;
    raise naming the field and what is wrong (credentials, a query or a fragment are refused)."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise RayConnectionError(f"Ray connection field {name!r} must be a string, got {value!r}")
    text = value.strip()
    if not text:
        return None
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises on a port that is not a number or out of range
    except ValueError as exc:
        raise RayConnectionError(f"Ray connection field {name!r} {value!r} is not a URL: {exc}") from None
    problem = (
        "must start with http:// or https://" if parts.scheme not in ("http", "https")
        else "has no host" if not parts.hostname
        else "must not carry a user name or password" if parts.username is not None or parts.password is not None
        else "must not have a query or fragment" if parts.query or parts.fragment or "#" in text
        else None
    )
    if problem:
        raise RayConnectionError(f"Ray connection field {name!r} {value!r} {problem}, e.g. {example}")
    return text.rstrip("/")


def _host_port_address(host: str | None, port: int | str | None) -> RayAddress | None:
    """The address the connection's Host/Port fields give, or None when both are empty."""
    text = (host or "").strip()
    # Port 0 is "no port": Airflow 3.3's connections list posts Number(null) == 0 for a connection
    # without one, and no Ray service listens on port 0.
    if port in (None, "", 0, "0"):
        port = None
    else:
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise RayConnectionError(f"Ray connection field 'port' must be a number, got {port!r}") from None
    if not text:
        if port is None:
            return None
        raise RayConnectionError(
            f"Ray connection field 'port' is {port} but 'host' is empty: set Host too, or clear Port"
        )
    if port is None:
        try:
            return parse_address(text)  # Host alone may be local, auto, host:port or ray://host:port
        except RayConnectionError as exc:
            raise RayConnectionError(f"Ray connection field 'host' {host!r} with no 'port': {exc}") from None
    if text in (LOCAL, AUTO):
        raise RayConnectionError(f"Ray connection field 'host' is {text!r}, which takes no port, but 'port' is {port}")
    if ":" in text and not text.startswith("[") and "://" not in text and text.count(":") > 1:
        text = f"[{text}]"  # a bare IPv6 literal
    try:
        return parse_address(f"{text}:{port}")
    except RayConnectionError as exc:
        raise RayConnectionError(f"Ray connection fields 'host' {host!r} and 'port' {port}: {exc}") from None


def _same_address(a: RayAddress, b: RayAddress) -> bool:
    return (a.kind, (a.host or "").lower(), a.port) == (b.kind, (b.host or "").lower(), b.port)


def _resolve_address(raw: Any, host: str | None, port: int | str | None) -> tuple[RayAddress, str]:
    """One address from the ``address`` extra and Host/Port; raise when both are set and disagree.

    Neither silently wins: the connection form used to pre-fill ``address=local``, and Host/Port typed
    next to it were ignored, so tasks ran on the embedded head instead of the cluster the user named.
    """
    if raw is not None and not isinstance(raw, str):
        raise RayConnectionError(f"Ray connection field 'address' must be a string, got {raw!r}")
    extra_text = (raw or "").strip()
    from_fields = _host_port_address(host, port)
    if not extra_text:
        if from_fields is None:
            return RayAddress(LOCAL), "default"
        return from_fields, "host/port"
    from_extra = parse_address(extra_text)
    if from_fields is None or _same_address(from_extra, from_fields):
        return from_extra, "address"
    shown = f"{(host or '').strip()}:{port}" if port not in (None, "", 0, "0") else (host or "").strip()
    raise RayConnectionError(
        f"Ray connection sets two different addresses: the 'address' extra is {extra_text!r} but "
        f"'host'/'port' give {shown!r}. Clear one of them (an empty 'address' uses Host/Port)."
    )


def merge_runtime_env(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """Task-level ``runtime_env`` over the connection default; ``env_vars`` are merged key by key."""
    merged = dict(base)
    for key, value in (override or {}).items():
        if key == "env_vars" and isinstance(value, dict) and isinstance(merged.get("env_vars"), dict):
            merged["env_vars"] = {**merged["env_vars"], **value}
        else:
            merged[key] = value
    return merged
