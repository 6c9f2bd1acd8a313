"""The ``ray`` connection in Airflow's UI: the form, the connections list's Test button, and what they send.

The browser test starts a real ``airflow api-server`` on a free loopback port (this session's
AIRFLOW_HOME and SQLite DB) and drives it in Debian's chromium with Playwright. Screenshots of
every step land in ``tests/output/connection_ui/`` (ignored by git), so a failure can be looked at.

Airflow 3.3.2's own part, which no provider can change: the list's Test button posts
``port: Number(connection.port)``, i.e. ``0`` for a connection without a port, and the API's
``_same_endpoint`` (airflow/api_fastapi/core_api/routes/public/connections.py:110-122) treats
``""`` but not ``0`` as "no port", so it answers 400 "The host or port to test differs from the
stored connection" (same file, 387-395), which the toast shows as "Bad Request".
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, browser_or_skip, running_api_server

# Its module-scoped fixtures stay in one lane.
pytestmark = pytest.mark.timeout(900)

OUTPUT = ROOT / "tests" / "output" / "connection_ui"
# A `local` Test starts the embedded head first (about 15 s idle), then probes it; under stress-ng beside the
# suite the first start took over 150 s (run 17), and a start may retry for up to START_DEADLINE_S (300 s).
TEST_TIMEOUT_MS = 400_000


@pytest.fixture(scope="module")
def api_server(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One API server for the module's tests (tests/support/browser.py); the `local` Test's embedded head is
    stopped afterwards unless it was already running before."""
    from airflow_ray_provider.local_cluster import LocalRayCluster

    embedded = LocalRayCluster()
    embedded_was_running = embedded.status() is not None
    try:
        with running_api_server(tmp_path_factory.mktemp("api"), OUTPUT) as base:
            yield base
    finally:
        if embedded.log_file.exists():  # the `local` Test's `ray start --head` output, if it ran
            OUTPUT.mkdir(parents=True, exist_ok=True)
            shutil.copy(embedded.log_file, OUTPUT / "embedded-head.log")
        if not embedded_was_running:
            embedded.stop()


def _store_connections(connections: dict[str, dict[str, Any]]) -> None:
    from airflow.models import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        session.execute(delete(Connection).where(Connection.conn_id.in_(list(connections))))
        for conn_id, fields in connections.items():
            extra = fields.pop("extra", None)
            session.add(Connection(conn_id=conn_id, conn_type="ray", extra=json.dumps(extra) if extra else None,
                                   **fields))


def _test_from_list(page: Any, base: str, conn_id: str) -> tuple[dict[str, Any], str]:
    """Press the Test button of ``conn_id``'s row; return the request body the UI sent and the toast's text."""
    page.goto(f"{base}/connections")  # a fresh page: no toast of an earlier row left over
    row = page.get_by_role("row").filter(has=page.get_by_text(conn_id, exact=True))
    row.wait_for(timeout=60_000)
    with page.expect_response(lambda r: r.url.endswith("/api/v2/connections/test"),
                              timeout=TEST_TIMEOUT_MS) as response:
        row.get_by_role("button", name="Test Connection").click()
    body = json.loads(response.value.request.post_data or "{}")
    toast = page.locator("[data-scope=toast][data-part=root]").first
    toast.wait_for(timeout=30_000)
    text = toast.inner_text()
    page.wait_for_timeout(800)  # let the toast finish sliding in, so the screenshot shows all of it
    page.screenshot(path=str(OUTPUT / f"test-{conn_id}.png"), full_page=True)
    return body, text


def _airflow_accepts_port_zero() -> bool:
    """Whether this Airflow's test endpoint treats the list's ``port: 0`` as "no port" (see the module doc)."""
    from airflow.api_fastapi.core_api.routes.public import connections

    return connections._same_endpoint(0, None)


def _session_head_token(airflow_home: Path) -> str | None:
    """The token of the ``ray_cluster`` fixture's head (started by LocalRayCluster, token auth by default)."""
    from airflow_ray_provider.local_cluster import LocalRayCluster

    cluster = LocalRayCluster(airflow_home / "session-ray")
    return cluster.auth_token() if hasattr(cluster, "auth_token") else None


def test_connections_list_test_button_in_chromium(api_server: str, ray_cluster: str, airflow_home: Path) -> None:
    from airflow_ray_provider.local_cluster import free_ports

    sync_playwright = browser_or_skip()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    host, port = ray_cluster.rsplit(":", 1)
    token = _session_head_token(airflow_home)
    (closed,) = free_ports(1)
    _store_connections({
        "ray_ui_hostport": {"host": host, "port": int(port), "password": token},
        # What the old form saved when a user typed Host/Port next to its pre-filled address=local.
        "ray_ui_conflict": {"host": host, "port": int(port), "password": token, "extra": {"address": "local"}},
        # `local` with Port 0: the provider reads 0 as "no port", and Airflow's check passes (0 == 0).
        "ray_ui_local": {"port": 0, "extra": {"namespace": "ui-test"}},
        # `local` with no port at all: Airflow 3.3.2 refuses it before the provider is asked.
        "ray_ui_local_noport": {"extra": {"address": "local"}},
        "ray_ui_closed": {"host": "127.0.0.1", "port": closed, "extra": {"connect_timeout": 3}},
    })
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{api_server}/connections")
            page.get_by_text("ray_ui_hostport", exact=True).wait_for(timeout=60_000)
            page.screenshot(path=str(OUTPUT / "connections-list.png"), full_page=True)
            results = {conn_id: _test_from_list(page, api_server, conn_id) for conn_id in (
                "ray_ui_hostport", "ray_ui_conflict", "ray_ui_local", "ray_ui_closed", "ray_ui_local_noport")}
        finally:
            browser.close()

    shown = {conn_id: text for conn_id, (_, text) in results.items()}
    (OUTPUT / "toasts.json").write_text(json.dumps(shown, indent=2))
    body, text = results["ray_ui_hostport"]
    assert body["port"] == int(port), body
    assert text.startswith("Test Connection Successful"), shown
    assert f"at {ray_cluster}: 1 node(s)" in text and "(from Host/Port)" in text, shown

    # Both fields set and different: a message naming both, not a silent run on the embedded head.
    text = results["ray_ui_conflict"][1]
    assert text.startswith("Test Connection Failed"), shown
    assert f"the 'address' extra is 'local' but 'host'/'port' give '{ray_cluster}'" in text, shown

    text = results["ray_ui_local"][1]
    assert text.startswith("Test Connection Successful"), shown
    assert "Connected to Ray 2." in text and "(embedded head, no address set)" in text, shown

    text = results["ray_ui_closed"][1]
    assert text.startswith("Test Connection Failed") and f"127.0.0.1:{closed}" in text, shown
    assert "Bad Request" not in text, shown

    body, text = results["ray_ui_local_noport"]
    assert body["port"] == 0, body  # the UI's Number(null)
    if _airflow_accepts_port_zero():  # an Airflow with the fix: the provider's answer comes through
        assert text.startswith("Test Connection Successful") and "(embedded head, from the 'address' extra" in text
    else:
        assert text == "Test Connection Failed\nBad Request", shown


def test_form_host_port_is_what_the_list_tests(api_server: str, ray_cluster: str, airflow_home: Path) -> None:
    """A Ray connection typed into the Add Connection form with Host/Port runs on that cluster."""
    sync_playwright = browser_or_skip()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    host, port = ray_cluster.rsplit(":", 1)
    from airflow.models import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:  # a leftover of an earlier run would make the form's Save fail
        session.execute(delete(Connection).where(Connection.conn_id == "ray_ui_form"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(f"{api_server}/connections")
            page.get_by_role("button", name="Add Connection").click()
            page.locator("input[name=connection_id]").fill("ray_ui_form")
            page.get_by_role("combobox").fill("Ray")
            page.get_by_role("option", name="Ray", exact=True).wait_for(timeout=30_000)
            page.keyboard.press("Enter")
            page.get_by_placeholder("GCS host", exact=False).fill(host)
            page.get_by_placeholder("GCS port", exact=False).fill(port)
            if token := _session_head_token(airflow_home):
                page.get_by_placeholder("token for clusters", exact=False).fill(token)
            page.get_by_text("Extra Fields", exact=True).click()
            page.get_by_text("Ray address", exact=True).wait_for(timeout=10_000)
            page.screenshot(path=str(OUTPUT / "form-filled.png"), full_page=True)
            with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/api/v2/connections")) as req:
                page.get_by_role("button", name="Save").click()
            saved = json.loads(req.value.post_data or "{}")
            body, text = _test_from_list(page, api_server, "ray_ui_form")
        finally:
            browser.close()
    extra = json.loads(saved.get("extra") or "{}")
    assert extra.get("address") in (None, ""), f"the form pre-filled address {extra.get('address')!r}: {saved}"
    assert (saved["host"], saved["port"]) == (host, int(port)), saved
    assert body["port"] == int(port), body
    assert text.startswith("Test Connection Successful") and f"at {ray_cluster}: " in text, text
    assert "(from Host/Port)" in text, text
