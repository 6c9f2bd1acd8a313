"""The provider as Airflow sees it: registered, its connection form declared the Airflow 3 way."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.smoke
def test_provider_is_registered_with_airflow() -> None:
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk import task

    manager = ProvidersManager()
    assert "airflow-ray-provider" in manager.providers
    hook = manager.hooks["ray"]
    assert hook is not None and hook.hook_class_name == "airflow_ray_provider.hooks.ray.RayHook"
    assert callable(task.ray)
    listed = subprocess.run([sys.executable, "-m", "airflow", "providers", "list"], capture_output=True, text=True,
                            timeout=120, env=os.environ.copy())
    assert "airflow-ray-provider" in listed.stdout, listed.stderr[-2000:]


def test_connection_fields_are_declared_the_airflow_3_way() -> None:
    from airflow_ray_provider.get_provider_info import get_provider_info
    from airflow_ray_provider.hooks.ray import RayHook

    conn_type = get_provider_info()["connection-types"][0]
    assert conn_type["connection-type"] == "ray"
    assert {"address", "namespace", "runtime_env"} <= set(conn_type["conn-fields"])
    assert conn_type["ui-field-behaviour"]["relabeling"]["password"] == "Ray auth token"
    assert not hasattr(RayHook, "get_connection_form_widgets") or RayHook.get_connection_form_widgets() == {}


def test_the_form_does_not_prefill_an_address() -> None:
    from airflow_ray_provider.get_provider_info import get_provider_info

    conn_type = get_provider_info()["connection-types"][0]
    address = conn_type["conn-fields"]["address"]["schema"]
    assert "default" not in address, "a pre-filled address shadows the Host/Port the user types"
    assert "empty" in conn_type["ui-field-behaviour"]["placeholders"]["port"]
