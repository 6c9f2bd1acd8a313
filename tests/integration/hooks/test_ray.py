"""``RayHook`` against the session's head: the Test button's probe, and one identity per process."""

from __future__ import annotations

import pytest

from airflow_ray_provider.exceptions import RayConnectionError


@pytest.mark.smoke
def test_test_connection_button(ray_cluster: str, connection) -> None:
    from airflow_ray_provider.hooks.ray import RayHook
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


def test_a_second_connection_with_another_identity_is_refused(ray_cluster: str, connection) -> None:
    """One process holds one Ray connection: another token, namespace or address is an error naming both
    connections, never a silent reuse of the first (which would run the task under the first's identity)."""
    import ray

    from airflow_ray_provider.hooks.ray import RayHook

    RayHook().get_conn()  # ray_default: the session cluster, namespace "tests"
    default_token = RayHook().settings.auth_token
    other_token = "other-token-" + "7" * 40

    connection("ray_other_token", password=other_token, extra={"address": ray_cluster, "namespace": "tests"})
    with pytest.raises(RayConnectionError) as info:
        RayHook("ray_other_token").get_conn()
    message = str(info.value)
    assert "'ray_other_token'" in message and "'ray_default'" in message, message
    assert "the auth token" in message and ray_cluster in message, message
    assert other_token not in message and (default_token is None or default_token not in message), message

    connection("ray_other_ns", password=default_token, extra={"address": ray_cluster, "namespace": "elsewhere"})
    with pytest.raises(RayConnectionError, match=r"namespace \(tests in use, elsewhere asked\)") as info:
        RayHook("ray_other_ns").get_conn()
    assert "'ray_other_ns'" in str(info.value) and "auth token" not in str(info.value)

    # The same cluster under another spelling is still another address: it is not silently taken as equal.
    other_address = ray_cluster.replace("127.0.0.1", "localhost")
    connection("ray_other_address", password=default_token, extra={"address": other_address, "namespace": "tests"})
    with pytest.raises(RayConnectionError, match=rf"cluster address \({ray_cluster} in use, {other_address} asked\)"):
        RayHook("ray_other_address").get_conn()

    # The same identity under another connection id is the same connection: reused.
    connection("ray_same", password=default_token, extra={"address": ray_cluster, "namespace": "tests"})
    assert RayHook("ray_same").get_conn() is ray
    assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42  # the connection still works after the refusals


def test_the_joined_clusters_system_config_is_read_and_a_plain_head_warns_of_nothing(
        ray_cluster: str, caplog: pytest.LogCaptureFixture) -> None:
    """The hook reads the cluster's system config when it connects (``outage_limit_warning``): on the session's
    head, started by the provider without one, there is nothing to warn of."""
    from airflow_ray_provider.cluster import ray_compat
    from airflow_ray_provider.hooks.ray import RayHook

    RayHook().get_conn()
    config = ray_compat.cluster_system_config()
    assert isinstance(config, dict) and ray_compat.GCS_RECONNECT_TIMEOUT_NAME not in config, config
    assert "overrides the" not in caplog.text
