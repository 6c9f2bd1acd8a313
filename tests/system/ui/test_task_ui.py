"""What users see of ``@task.ray`` in the Airflow UI: links to the Ray dashboard, readable XCom rows, the Ray tab.

One mapped DAG runs on the embedded head started with its dashboard; a real ``airflow api-server``
reads it back (REST, and the UI in headless chromium). Each extra link is checked against the
dashboard itself (its state API must know that task, node and log file; the link opens the task's
page). The DAG run's *Ray* tab (the provider's plugin) must list the run's objects for a viewer,
refuse a copied reference row, refuse a viewer's release, and free the objects when an admin
presses its button. Screenshots land in ``tests/output/task_ui/``.
"""

from __future__ import annotations

import contextlib
import html
import http.server
import json
import re
import secrets
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, browser_or_skip, running_api_server
from tests.support.dag_runs import run_py

# Its module-scoped fixtures stay in one lane.
pytestmark = pytest.mark.timeout(900)

OUTPUT = ROOT / "tests" / "output" / "task_ui"
FRAME_SUMMARY = "DataFrame 1000000 rows x 2 columns [x, y]"  # tests/dags/ui_dags.py's frame()


def frame_bytes() -> int:
    """The in-memory size of tests/dags/ui_dags.py's frame(), as pandas counts it."""
    import numpy as np
    import pandas as pd

    from tests.dags.ui_dags import FRAME_ROWS

    frame = pd.DataFrame({"x": np.arange(FRAME_ROWS, dtype="float64"), "y": np.ones(FRAME_ROWS)})
    return int(frame.memory_usage(index=True, deep=False).sum())


# -- end to end ---------------------------------------------------------------------------------------------------
def _get(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
        body = resp.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body.decode(errors="replace")


def _ray_state(dashboard: str, token: str | None, path: str, **params: str) -> Any:
    """One call to the Ray dashboard's state API (``/api/v0/...``), retried while it catches up."""
    url = f"{dashboard}{path}?{urllib.parse.urlencode(params)}"
    deadline = time.monotonic() + 60
    while True:
        answer = _get(url, token)
        if isinstance(answer, dict) and answer.get("result"):
            return answer["data"]
        if time.monotonic() > deadline:
            raise AssertionError(f"the Ray dashboard did not answer {url}: {str(answer)[:2000]}")
        time.sleep(2)


@dataclass
class LinksRun:
    """One run of ``ray_links`` on the embedded head with its dashboard, and an API server to read it back.

    The API server has two users, an admin and a viewer (Airflow's simple auth manager); ``admin`` and
    ``viewer`` are their API tokens. One server for every test here: the Ray tab's test needs both users.
    """

    api: str
    dashboard: str
    token: str | None  # the Ray cluster's
    run_id: str
    output: str
    db: Path  # the session's SQLite metadata DB
    admin: str
    viewer: str

    def links(self, task_id: str, map_index: int = -1) -> dict[str, str | None]:
        return _get(f"{self.api}/api/v2/dags/ray_links/dagRuns/{urllib.parse.quote(self.run_id)}/taskInstances/"
                    f"{task_id}/links?map_index={map_index}", self.admin)["extra_links"]


def _token(api: str, user: str, password: str) -> str:
    request = urllib.request.Request(f"{api}/auth/token", data=json.dumps({"username": user, "password": password})
                                     .encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())["access_token"]




@pytest.fixture(scope="module")
def links_run(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinksRun]:
    from airflow_ray_provider.local_cluster import LocalRayCluster

    embedded = LocalRayCluster(include_dashboard=True)  # $AIRFLOW_HOME/ray: the connection's `local`
    running = embedded.status()
    if running is not None and not running.dashboard_url:
        embedded.stop()  # another test's embedded head, started without the dashboard
    state = embedded.ensure_running()
    assert state.dashboard_url, state
    conn = {"conn_type": "ray", "extra": {"address": "local", "namespace": "links"}}  # no dashboard_url: derived
    try:
        result, output = run_py("""
            from tests.dags import ui_dags
            dr = ui_dags.ray_links_dag.test()
            emit(states={f"{t}[{m}]": s for (t, m), s in ti_states(dr).items()}, run_id=dr.run_id,
                 total=pulled(dr, "total"))
        """, env={"AIRFLOW_CONN_RAY_DEFAULT": json.dumps(conn)})
        assert set(result["states"].values()) == {"success"}, output[-6000:]
        assert result["total"] == 30
        workdir = tmp_path_factory.mktemp("api")
        passwords = {"admin": secrets.token_urlsafe(12), "viewer": secrets.token_urlsafe(12)}
        (workdir / "passwords.json").write_text(json.dumps(passwords))
        users = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                 "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
                 "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(workdir / "passwords.json")}
        with running_api_server(workdir, OUTPUT, users) as api:
            yield LinksRun(api, state.dashboard_url.rstrip("/"), embedded.auth_token(), result["run_id"], output,
                           airflow_db, *(_token(api, name, passwords[name]) for name in ("admin", "viewer")))
    finally:
        embedded.stop()


def test_mapped_task_instances_link_to_their_ray_task_node_and_worker_logs(links_run: LinksRun) -> None:
    base, token = links_run.dashboard, links_run.token
    seen: dict[int, dict[str, str | None]] = {}
    for index in (0, 1):
        links = seen[index] = links_run.links("work", index)
        assert set(links) == {"Ray task", "Ray node", "Ray worker logs"}, links
        assert all(url and url.startswith(f"{base}/#/") for url in links.values()), links
        task_m = re.fullmatch(rf"{re.escape(base)}/#/jobs/([0-9a-f]+)/tasks/([0-9a-f]+)", links["Ray task"] or "")
        node_m = re.fullmatch(rf"{re.escape(base)}/#/cluster/nodes/([0-9a-f]+)", links["Ray node"] or "")
        logs_q = urllib.parse.parse_qs(urllib.parse.urlsplit((links["Ray worker logs"] or "").split("#/", 1)[1]).query)
        assert task_m and node_m and set(logs_q) == {"nodeId", "fileName"}, links
        job_id, task_id = task_m.groups()
        node_id, worker_id = node_m.group(1), logs_q["fileName"][0]
        assert logs_q["nodeId"] == [node_id]
        assert f"Ray dashboard: {links['Ray task']}" in links_run.output  # the task log says where to look too

        # The dashboard knows that task: this instance's callable, finished, on that node and worker.
        (row,) = _ray_state(base, token, "/api/v0/tasks", filter_keys="task_id", filter_predicates="=",
                            filter_values=task_id)["result"]["result"]
        assert (row["name"], row["state"], row["job_id"], row["node_id"], row["worker_id"]) == (
            f"ray_links.work[{index}]", "FINISHED", job_id, node_id, worker_id), row
        # The logs link lists the worker's own files, which hold what the callable wrote to each descriptor.
        files = _ray_state(base, token, "/api/v0/logs", node_id=node_id, glob=f"*{worker_id}*")["result"]
        for group, text in (("worker_out", f"links-demo stdout {index + 1}"),
                            ("worker_err", f"links-demo stderr {index + 1}")):
            (name,) = files[group]
            content = _get(f"{base}/api/v0/logs/file?" + urllib.parse.urlencode(
                {"node_id": node_id, "filename": name, "lines": 5000}), token)
            assert text in str(content), (name, str(content)[-2000:])
        # The task's own page shows its slice of those files (Ray records where each task's output starts and ends).
        for suffix, text in (("out", f"links-demo stdout {index + 1}"), ("err", f"links-demo stderr {index + 1}")):
            content = _get(f"{base}/api/v0/logs/file?" + urllib.parse.urlencode(
                {"task_id": task_id, "suffix": suffix, "lines": 5000}), token)
            assert text in str(content), (task_id, suffix, str(content)[-2000:])
    assert seen[0]["Ray task"] != seen[1]["Ray task"]  # each mapped instance links to its own Ray task
    assert links_run.links("total") == {}  # a plain @task has none


def test_the_xcom_row_leads_with_what_a_person_reads_and_the_api_never_joins_ray(links_run: LinksRun) -> None:
    def drivers() -> list[str]:
        jobs = _get(f"{links_run.dashboard}/api/jobs/", links_run.token)
        return sorted(j["job_id"] for j in jobs if j.get("type") == "DRIVER")

    before = drivers()
    entry = f"{links_run.api}/api/v2/dags/ray_links/dagRuns/{urllib.parse.quote(links_run.run_id)}/taskInstances/" \
            "frame/xcomEntries/return_value"
    raw = _get(entry, links_run.viewer)["value"]  # what the DB row holds
    shown = _get(entry + "?deserialize=true", links_run.viewer)["value"]  # what the XCom tab asks for
    for value in (raw, shown):
        row = json.loads(value) if isinstance(value, str) else value
        assert list(row)[:5] == ["summary", "type", "size", "nodes", "checkpoint"], row
        assert (row["summary"], row["type"]) == (FRAME_SUMMARY, "pandas.core.frame.DataFrame"), row
        # Its size in Ray's object store: the frame's data plus what pickling a DataFrame adds.
        assert frame_bytes() <= row["size"] < frame_bytes() + 64 * 1024, row
        assert len(row["nodes"]) == 1 and len(json.dumps(row)) < 4096, row
    # Neither read made the API server a Ray driver (it would show up in the cluster's job table).
    assert drivers() == before


def test_the_task_page_shows_the_links_and_ray_task_opens_its_dashboard_page(links_run: LinksRun) -> None:
    sync_playwright = browser_or_skip()
    expected = links_run.links("work", 1)["Ray task"]
    assert expected
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.add_cookies([{"name": "_token", "value": links_run.viewer, "url": links_run.api + "/"}])
            page = context.new_page()
            page.goto(f"{links_run.api}/dags/ray_links/runs/{urllib.parse.quote(links_run.run_id)}/tasks/work/mapped/1/details")
            link = page.get_by_role("link", name="Ray task")
            try:
                link.wait_for(timeout=90_000)
            finally:
                page.screenshot(path=str(OUTPUT / "task-instance.png"), full_page=True)
            assert link.get_attribute("href") == expected
            # The dashboard asks for the cluster's token; Ray keeps it in this cookie once given.
            if links_run.token:
                context.add_cookies([{"name": "ray-authentication-token", "value": links_run.token,
                                      "url": links_run.dashboard + "/"}])
            ray_page = context.new_page()
            ray_page.goto(expected)
            try:
                ray_page.get_by_text(expected.rsplit("/", 1)[1]).first.wait_for(timeout=90_000)
            finally:
                ray_page.screenshot(path=str(OUTPUT / "ray-dashboard-task.png"), full_page=True)
            # The XCom tab: the stored reference, read from the metadata DB; what a person wants leads.
            xcom_page = context.new_page()
            xcom_page.goto(f"{links_run.api}/dags/ray_links/runs/{urllib.parse.quote(links_run.run_id)}/tasks/"
                           "frame/xcom")
            expand = xcom_page.get_by_role("button", name="Expand all extra JSON")
            expand.wait_for(timeout=90_000)
            expand.click()
            row = xcom_page.get_by_role("row").filter(has_text="return_value")
            try:
                row.get_by_text(FRAME_SUMMARY).wait_for(timeout=30_000)
            finally:
                xcom_page.screenshot(path=str(OUTPUT / "xcom-tab.png"), full_page=True)
            # The JSON view puts no-break spaces between tokens.
            shown = [line.replace("\xa0", " ").strip() for line in row.inner_text().splitlines() if line.strip()]
            start = shown.index("{")
            assert shown[start + 1:start + 3] == [f'"summary": "{FRAME_SUMMARY}",',
                                                  '"type": "pandas.core.frame.DataFrame",'], shown
            assert re.fullmatch(r'"size": \d+,', shown[start + 3]), shown
        finally:
            browser.close()


# -- the Ray tab of a DAG run (last: it releases the run's objects) -----------------------------------------------
def _call(method: str, url: str, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=180) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@contextlib.contextmanager
def page_of_another_port(document: str) -> Iterator[str]:
    """Serve ``document`` from another port of this host: same site as the API server, another origin."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            body = document.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_the_ray_tab_shows_the_runs_objects_and_only_editors_release_them(links_run: LinksRun) -> None:
    api, admin, viewer = links_run.api, links_run.admin, links_run.viewer
    run = f"{api}/ray/runs/ray_links/{urllib.parse.quote(links_run.run_id)}"

    # A viewer sees the objects (what the XCom rows and the owner say, no object fetched)...
    status, view = _call("GET", f"{run}/objects", viewer)
    assert status == 200, view
    rows = {(o["task_id"], o["map_index"]): o for o in view["objects"]}
    assert set(rows) == {("work", 0), ("work", 1), ("frame", -1)}, view
    assert {o["status"] for o in rows.values()} == {"in Ray"}, view
    frame = rows[("frame", -1)]
    assert frame["summary"] == FRAME_SUMMARY and "/frame/-1/result/" in frame["checkpoint"], frame
    assert frame["held_since"] and frame["nodes"], frame
    assert view["refused"] == [] and view["clusters"]["ray_default"]["error"] is None, view
    used_before = view["clusters"]["ray_default"]["store_used_bytes"]
    assert used_before >= 15 * 2**20, view  # the 16 MB frame is in the object store

    # A reference row copied (as a DB editor could) to another task's row is refused, not shown as an object.
    copy_sql = ("INSERT INTO xcom (dag_run_id, task_id, map_index, key, dag_id, run_id, value, timestamp) "
                "SELECT dag_run_id, 'total', -1, 'copied', dag_id, run_id, value, timestamp FROM xcom "
                "WHERE dag_id = 'ray_links' AND run_id = ? AND task_id = 'frame' AND key = 'return_value'")
    with sqlite3.connect(links_run.db) as db:
        db.execute(copy_sql, (links_run.run_id,))
    try:
        copied = _call("GET", f"{run}/objects", viewer)[1]
    finally:
        with sqlite3.connect(links_run.db) as db:
            db.execute("DELETE FROM xcom WHERE dag_id = 'ray_links' AND key = 'copied'")
    assert len(copied["objects"]) == 3 and len(copied["refused"]) == 1, copied
    assert copied["refused"][0]["task_id"] == "total" and "copied from another task" in copied["refused"][0][
        "error"], copied

    # ...but may not release them: that takes edit access to the DAG's runs.
    status, body = _call("POST", f"{run}/release", viewer)
    assert status == 403, body
    assert {o["status"] for o in _call("GET", f"{run}/objects", viewer)[1]["objects"]} == {"in Ray"}
    assert _call("GET", f"{api}/ray/runs/no_such_dag/x/objects", admin)[1]["objects"] == []

    # The admin, in the browser: the DAG run's Ray tab shows the same, and its button releases them.
    sync_playwright = browser_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1000})
            context.add_cookies([{"name": "_token", "value": admin, "url": api + "/"}])
            # Cross-site request forgery: a page on another port of the host (the Ray dashboard, Jupyter)
            # posts a form to the release endpoint; the admin's cookie goes with it, and it is refused.
            form = (f'<form method="post" action="{html.escape(run)}/release"></form>'
                    "<script>document.forms[0].submit()</script>")
            with page_of_another_port(form) as attacker:
                forged = context.new_page()
                with forged.expect_response(lambda r: r.url.endswith("/release"), timeout=60_000) as posted:
                    forged.goto(attacker)
                assert posted.value.status == 403, posted.value.text()
                assert "must come from the Ray tab itself" in posted.value.text()
                forged.close()
            page = context.new_page()
            page.goto(f"{api}/dags/ray_links/runs/{urllib.parse.quote(links_run.run_id)}")
            page.get_by_role("link", name="Ray", exact=True).or_(
                page.get_by_role("tab", name="Ray", exact=True)).first.click(timeout=90_000)
            tab = page.frame_locator("iframe[title='Ray']")
            held = tab.locator("tr[data-status='in Ray']")
            try:
                held.nth(2).wait_for(timeout=120_000)
            finally:
                page.screenshot(path=str(OUTPUT / "ray-tab.png"), full_page=True)
            assert held.count() == 3
            assert tab.get_by_text(FRAME_SUMMARY).count() == 1
            tab.get_by_role("button", name="Release this run's Ray objects").click()
            tab.get_by_role("button", name="Click again to release them from Ray now").click()
            message = tab.get_by_text("Released 3 object(s).")
            try:
                message.wait_for(timeout=120_000)
                tab.locator("tr[data-status='only in checkpoint']").first.wait_for(timeout=60_000)
            finally:
                page.screenshot(path=str(OUTPUT / "ray-tab-released.png"), full_page=True)
            statuses = [row.get_attribute("data-status") for row in tab.locator("tbody tr").all()]
            assert sorted(statuses) == ["gone", "gone", "only in checkpoint"], statuses
        finally:
            browser.close()

    # The object store's use drops by the frame (Ray frees it shortly after its last reference goes);
    # what stays is its checkpoint, which restores it.
    deadline = time.monotonic() + 60
    while True:
        after = _call("GET", f"{run}/objects", admin)[1]
        used_after = after["clusters"]["ray_default"]["store_used_bytes"]
        if used_after <= used_before - 15 * 2**20 or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert used_after <= used_before - 15 * 2**20, (used_before, after)
    assert {(o["task_id"], o["status"]) for o in after["objects"]} == {
        ("work", "gone"), ("frame", "only in checkpoint")}, after
