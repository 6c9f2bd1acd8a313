"""``RayHook`` without a cluster: which Ray Client connect errors it tries again."""

from __future__ import annotations


def test_a_failed_client_server_start_is_recognised_through_the_wrapping() -> None:
    """The one Ray Client failure the hook tries again (``hooks.ray._connect_bounded``): Ray's proxier
    raises it in the server and the client wraps it; any other connect error is not retried."""
    from airflow_ray_provider.hooks.ray import CLIENT_SERVER_START_FAILED, _client_server_start_failed

    server = RuntimeError(f"{CLIENT_SERVER_START_FAILED}. See ray_client_server_23000.err for detailed logs.")
    try:
        try:
            raise server
        except RuntimeError as exc:
            raise ConnectionError(f"Initialization failure from server:\n{exc}") from exc
    except ConnectionError as wrapped:
        assert _client_server_start_failed(wrapped)
    assert not _client_server_start_failed(ConnectionError("ray client connection timeout"))
    assert not _client_server_start_failed(None)


def test_a_cluster_wide_reconnect_timeout_below_the_drivers_is_named() -> None:
    """A cluster's system config overrides a driver's ``RAY_gcs_rpc_server_reconnect_timeout_s`` (measured,
    ``outage_limit_warning``'s docstring): a lower one ends Airflow processes in an outage, which is said."""
    from airflow_ray_provider.hooks.ray import outage_limit_warning

    warning = outage_limit_warning({"gcs_rpc_server_reconnect_timeout_s": 5}, "10.0.0.1:6379", "604800")
    assert warning and "10.0.0.1:6379" in warning and "= 5 " in warning and "604800 s" in warning
    assert "--system-config" in warning
    assert outage_limit_warning({}, "a:1", "604800") is None  # not set cluster-wide: the driver's value holds
    assert outage_limit_warning({"gcs_rpc_server_reconnect_timeout_s": 604800}, "a:1", "604800") is None
    assert outage_limit_warning({"gcs_rpc_server_reconnect_timeout_s": 900}, "a:1", "600") is None
    assert "'soon'" in outage_limit_warning({"gcs_rpc_server_reconnect_timeout_s": "soon"}, "a:1", "600")
