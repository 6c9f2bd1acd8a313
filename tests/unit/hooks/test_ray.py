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
