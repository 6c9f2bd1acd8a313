"""The ``ray`` connection's fields as the provider parses them: addresses, Host/Port, extras, dashboard URLs."""

from __future__ import annotations

import pytest

from airflow_ray_provider.exceptions import RayConnectionError
from airflow_ray_provider.hooks.ray import dashboard_url
from airflow_ray_provider.hooks.settings import RaySettings, merge_runtime_env, parse_address, parse_dashboard_url


@pytest.mark.parametrize(
    ("raw", "kind", "text"),
    [
        ("", "local", "local"),
        ("local", "local", "local"),
        ("auto", "auto", "auto"),
        ("10.1.2.3:6380", "gcs", "10.1.2.3:6380"),
        ("raycluster-head-svc.ray.svc.cluster.local:6379", "gcs", "raycluster-head-svc.ray.svc.cluster.local:6379"),
        ("ray://head:10001", "client", "ray://head:10001"),
        ("[::1]:6380", "gcs", "::1:6380"),
    ],
)
def test_address_forms(raw: str, kind: str, text: str) -> None:
    address = parse_address(raw)
    assert address.kind == kind
    assert str(address).replace("[", "").replace("]", "") == text


def test_an_ipv6_address_prints_in_the_form_it_parses_from() -> None:
    assert str(parse_address("[::1]:6380")) == "[::1]:6380"
    assert parse_address(str(parse_address("ray://[fd00::2]:10001"))) == parse_address("ray://[fd00::2]:10001")


@pytest.mark.parametrize("raw", ["http://head:8265", "head", "head:port", "head:99999", "ray://", ":123"])
def test_malformed_addresses_name_the_input(raw: str) -> None:
    with pytest.raises(RayConnectionError, match="Malformed Ray address") as info:
        parse_address(raw)
    assert repr(raw) in str(info.value)


def test_settings_from_connection_fields() -> None:
    settings = RaySettings.from_fields(
        host="head", port=6380, password="s3cret",
        extra={"namespace": "team-a", "runtime_env": '{"env_vars": {"A": "1"}}', "lease_timeout": "30"},
    )
    assert str(settings.address) == "head:6380"
    assert settings.namespace == "team-a"
    assert settings.runtime_env == {"env_vars": {"A": "1"}}
    assert settings.lease_timeout == 30.0
    assert "s3cret" not in repr(settings)  # the token never shows in logs or reprs
    assert str(RaySettings.from_fields(extra={"address": "ray://h:10001"}).address) == "ray://h:10001"
    assert RaySettings.from_fields().address.kind == "local"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"runtime_env": "{oops"}, "'runtime_env' is not valid JSON"),
        ({"runtime_env": [1]}, "'runtime_env' must be a JSON object"),
        ({"lease_timeout": "soon"}, "'lease_timeout' must be a number"),
        ({"lease_timeout": 1}, "'lease_timeout' must be at least 5"),
        ({"namespace": "a/b"}, "'namespace' has odd characters"),
    ],
)
def test_bad_connection_fields_are_named(extra: dict, message: str) -> None:
    with pytest.raises(RayConnectionError, match=message):
        RaySettings.from_fields(extra=extra)


def test_task_runtime_env_merges_over_the_default() -> None:
    base = {"env_vars": {"A": "1", "B": "1"}, "pip": ["x"]}
    assert merge_runtime_env(base, {"env_vars": {"B": "2"}, "pip": ["y"]}) == {
        "env_vars": {"A": "1", "B": "2"}, "pip": ["y"],
    }
    assert merge_runtime_env(base, None) == base


# -- Host/Port versus the `address` extra (no browser) -----------------------------------------------------------
def test_host_port_and_address_extra_never_silently_disagree() -> None:
    # What the old form saved when a user typed Host/Port: its pre-filled address=local used to win.
    with pytest.raises(RayConnectionError) as info:
        RaySettings.from_fields(host="10.0.0.5", port=6380, extra={"address": "local"})
    assert "'local'" in str(info.value) and "'10.0.0.5:6380'" in str(info.value)
    with pytest.raises(RayConnectionError, match=r"'head-a:6379'.*'head-b:6379'"):
        RaySettings.from_fields(host="head-b", port=6379, extra={"address": "head-a:6379"})
    # The same cluster twice is fine; so is either field alone.
    agreed = RaySettings.from_fields(host="Head", port=6379, extra={"address": "head:6379"})
    assert str(agreed.address) == "head:6379" and agreed.address_source == "address"
    for extra in ({}, {"address": None}, {"address": ""}, {"address": "  "}):
        settings = RaySettings.from_fields(host="head", port=6379, extra=extra)
        assert (str(settings.address), settings.address_source) == ("head:6379", "host/port")
    assert RaySettings.from_fields(extra={"address": "auto"}).address.kind == "auto"
    assert RaySettings.from_fields(host="ray://head", port=10001).address.kind == "client"
    default = RaySettings.from_fields(extra={"namespace": "x"})
    assert (default.address.kind, default.address_source) == ("local", "default")


def test_port_zero_means_no_port_and_a_lone_port_is_named() -> None:
    # Airflow's connections list sends port 0 for "no port" (Number(null)); nothing listens on port 0.
    assert RaySettings.from_fields(port=0).address.kind == "local"
    assert RaySettings.from_fields(host="local", port=0).address.kind == "local"
    assert RaySettings.from_fields(host="auto", port=0, extra={"address": "auto"}).address.kind == "auto"
    with pytest.raises(RayConnectionError, match="'port' is 6379 but 'host' is empty"):
        RaySettings.from_fields(port=6379)
    with pytest.raises(RayConnectionError, match="'host' is 'local', which takes no port, but 'port' is 6379"):
        RaySettings.from_fields(host="local", port=6379)
    with pytest.raises(RayConnectionError, match="'host' 'head' with no 'port'"):
        RaySettings.from_fields(host="head")
    with pytest.raises(RayConnectionError, match="'address' must be a string"):
        RaySettings.from_fields(extra={"address": 6379})


# -- no Ray: the connection field and the URLs ------------------------------------------------------------------
def test_dashboard_url_is_a_web_address_or_an_error_naming_it() -> None:
    assert parse_dashboard_url("http://ray-head:8265/") == "http://ray-head:8265"
    assert parse_dashboard_url(" https://example.com/ray/dash ") == "https://example.com/ray/dash"
    assert parse_dashboard_url(None) is None and parse_dashboard_url("  ") is None
    for bad, why in (("javascript:alert(1)", "must start with http"), ("ray-head:8265", "must start with http"),
                     ("http://", "has no host"), ("http://user:secret@ray-head:8265", "user name or password"),
                     ("http://ray-head:8265/?a=1", "query or fragment"), ("http://ray-head:8265/#/jobs", "fragment"),
                     ("http://ray-head:99999", "not a URL"), (8265, "must be a string")):
        with pytest.raises(RayConnectionError, match="'dashboard_url'") as info:
            parse_dashboard_url(bad)
        assert why in str(info.value), (bad, str(info.value))
    with pytest.raises(RayConnectionError, match="dashboard_url"):
        RaySettings.from_fields(extra={"address": "head:6379", "dashboard_url": "file:///etc/passwd"})
    # A remote cluster links only where the connection says; nothing is guessed from the GCS address.
    remote = RaySettings.from_fields(extra={"address": "head:6379", "dashboard_url": "http://dash.example:80"})
    assert dashboard_url(remote) == "http://dash.example:80"
    assert dashboard_url(RaySettings.from_fields(extra={"address": "head:6379"})) is None


def test_gateway_url_is_a_web_address_or_an_error_naming_it() -> None:
    settings = RaySettings.from_fields(extra={"gateway_url": "https://ray-gw.example:8443/", "gateway_ca": "/ca.pem"})
    assert (settings.gateway_url, settings.gateway_ca) == ("https://ray-gw.example:8443", "/ca.pem")
    assert RaySettings.from_fields(extra={}).gateway_url is None  # no gateway: this process is a Ray driver
    for bad, why in (("ray-gw:8270", "must start with http"), ("http://k:s@ray-gw:8270", "user name or password"),
                     ("http://ray-gw:8270/?x=1", "query or fragment"), (8270, "must be a string")):
        with pytest.raises(RayConnectionError, match="'gateway_url'") as info:
            RaySettings.from_fields(extra={"gateway_url": bad})
        assert why in str(info.value), (bad, str(info.value))
    with pytest.raises(RayConnectionError, match="'gateway_ca' must be a string"):
        RaySettings.from_fields(extra={"gateway_url": "http://gw:8270", "gateway_ca": True})
