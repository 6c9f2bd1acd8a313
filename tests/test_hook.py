"""The ``ray`` connection: parsing, the provider registration, the UI's Test button."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from airflow_ray_provider.settings import (
    RayConnectionError,
    RaySettings,
    merge_runtime_env,
    parse_address,
)


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


def test_provider_is_registered_with_airflow() -> None:
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk import task

    manager = ProvidersManager()
    assert "airflow-ray-provider" in manager.providers
    hook = manager.hooks["ray"]
    assert hook is not None and hook.hook_class_name == "airflow_ray_provider.hooks.RayHook"
    assert callable(task.ray)
    listed = subprocess.run([sys.executable, "-m", "airflow", "providers", "list"], capture_output=True, text=True,
                            timeout=120, env=os.environ.copy())
    assert "airflow-ray-provider" in listed.stdout, listed.stderr[-2000:]


def test_connection_fields_are_declared_the_airflow_3_way() -> None:
    from airflow_ray_provider.get_provider_info import get_provider_info
    from airflow_ray_provider.hooks import RayHook

    conn_type = get_provider_info()["connection-types"][0]
    assert conn_type["connection-type"] == "ray"
    assert {"address", "namespace", "runtime_env"} <= set(conn_type["conn-fields"])
    assert conn_type["ui-field-behaviour"]["relabeling"]["password"] == "Ray auth token"
    assert not hasattr(RayHook, "get_connection_form_widgets") or RayHook.get_connection_form_widgets() == {}


def test_test_connection_button(ray_cluster: str, connection) -> None:
    from airflow_ray_provider.hooks import RayHook
    from airflow_ray_provider.local_cluster import free_ports

    ok, message = RayHook().test_connection()
    assert ok, message
    assert message.startswith("Connected to Ray 2.") and "1 node(s), 4 CPU" in message
    (port,) = free_ports(1)
    ok, message = RayHook(connection("ray_closed", extra={"address": f"127.0.0.1:{port}"})).test_connection()
    assert not ok
    assert f"127.0.0.1:{port}" in message
    ok, message = RayHook(connection("ray_garbled", extra={"address": "http://x:1"})).test_connection()
    assert not ok and "Malformed Ray address 'http://x:1'" in message
