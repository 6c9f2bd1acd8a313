"""The Ray view of a DAG run, served by Airflow's API server (a plugin's ``fastapi_apps`` under ``/ray``).

``GET  /ray/runs/{dag_id}/{run_id}/objects``: the run's Ray objects (each task's, from its XCom rows)
with, from the owner actors, whether each is still in Ray or only in its checkpoint, and each
cluster's object store use. Needs read access to the DAG's XComs.

``POST /ray/runs/{dag_id}/{run_id}/release``: release the run's objects early. Needs edit access to
the DAG's runs, as clearing or marking one does, and, from a browser session, the header
``X-Airflow-Ray-CSRF: 1`` that only a script of the same origin can set (``same_origin_only``).

``GET  /ray/view/{dag_id}/{run_id}``: the page the DAG run's *Ray* tab shows (an external view with
destination ``dag_run``); it calls the two endpoints above with the user's own session.

The rows are authenticated (``parse_reference``) and checked against the row they were read from,
as the XCom backend does, before anything in them is used. Owners are asked from a throwaway
process per connection (:mod:`.inspect`), so the API server never becomes a Ray driver; no object
is ever fetched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from airflow_ray_provider.exceptions import RayXComReferenceError, SigningError
from airflow_ray_provider.ui.inspect import InspectReport, held_id
from airflow_ray_provider.xcom.backend import Read, check_origin
from airflow_ray_provider.xcom.reference import RayObject, all_objects, is_reference, parse_reference

# connect_timeout (30 s by default) plus the owner calls: the page says so rather than hanging.
INSPECT_TIMEOUT_S = 120.0
# Each inspection is a Python process importing Ray (about 95 MiB, seconds of CPU): at most this many at once
# per API server process, and a listing just made is served again for a few seconds, so a burst of page loads
# (eight tabs, a reload loop) runs one process instead of eight that all time out together.
INSPECT_AT_ONCE = 2
INSPECT_REUSE_S = 5.0
_inspections = threading.BoundedSemaphore(INSPECT_AT_ONCE)
_recent_lock = threading.Lock()
_recent: dict[tuple[str, tuple[str, ...]], tuple[float, InspectReport]] = {}
PAGE = Path(__file__).with_name("ray_run.html")

app = FastAPI(title="Ray objects of a DAG run", description="Part of airflow-ray-provider.")


@dataclass
class ObjectRow:
    """One Ray object of the run, as the view lists it."""

    task_id: str
    map_index: int
    xcom_key: str
    item: str | None
    summary: str
    type: str
    size: int | None
    nodes: list[str]
    checkpoint: str | None
    conn_id: str
    # From the owner: "in Ray" (held), "only in checkpoint", "gone", or "unknown" (the owner could not be asked).
    status: str = "unknown"
    held_since: float | None = None


@dataclass
class RunView:
    dag_id: str
    run_id: str
    objects: list[ObjectRow] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)  # rows that failed authentication
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)  # conn_id -> store use or error
    released: int = 0


def _run_objects(session: Any, dag_id: str, run_id: str) -> tuple[list[tuple[ObjectRow, RayObject]], list[dict]]:
    from airflow.models.xcom import XComModel

    rows = session.execute(
        select(XComModel.task_id, XComModel.map_index, XComModel.key, XComModel.value)
        .where(XComModel.dag_id == dag_id, XComModel.run_id == run_id)
        .order_by(XComModel.task_id, XComModel.map_index, XComModel.key)
    ).all()
    found: list[tuple[ObjectRow, RayObject]] = []
    refused: list[dict[str, Any]] = []
    for task_id, map_index, key, value in rows:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                continue  # not JSON, so not a reference
        if not is_reference(value):
            continue
        try:
            ref = parse_reference(value)
            check_origin(ref, Read(dag_id, task_id, run_id, map_index, key))
        except (RayXComReferenceError, SigningError) as exc:
            refused.append({"task_id": task_id, "map_index": map_index, "xcom_key": key, "error": str(exc)})
            continue
        for obj in all_objects(ref):
            row = ObjectRow(task_id=task_id, map_index=map_index, xcom_key=key, item=obj.item,
                            summary=obj.summary, type=obj.type, size=obj.size, nodes=list(obj.nodes),
                            checkpoint=(obj.checkpoint or {}).get("uri"), conn_id=obj.location.conn_id)
            found.append((row, obj))
    return found, refused


def _inspect(conn_id: str, objects: list[RayObject], release: bool) -> InspectReport:
    """Ask the owners of ``objects`` (and release them) from a throwaway process, bounded as said above."""
    wanted = (conn_id, tuple(sorted(o.key for o in objects)))

    def reusable() -> InspectReport | None:
        with _recent_lock:
            at, report = _recent.get(wanted, (0.0, None))
        return report if report is not None and not release and time.monotonic() - at < INSPECT_REUSE_S else None

    if (report := reusable()) is not None:
        return report
    if not _inspections.acquire(timeout=INSPECT_TIMEOUT_S):
        return InspectReport(error=f"the API server is busy asking Ray clusters ({INSPECT_AT_ONCE} at once, none "
                                   f"finished within {INSPECT_TIMEOUT_S:g}s); try again later")
    try:
        if (report := reusable()) is not None:  # made while this request waited
            return report
        report = _run_inspection(conn_id, objects, release)
    finally:
        _inspections.release()
    with _recent_lock:
        for key in [k for k, (at, _) in _recent.items() if time.monotonic() - at >= INSPECT_REUSE_S]:
            del _recent[key]
        if release:
            _recent.pop(wanted, None)  # what was listed before the release is no longer true
        elif report.error is None:
            _recent[wanted] = (time.monotonic(), report)
    return report


def _run_inspection(conn_id: str, objects: list[RayObject], release: bool) -> InspectReport:
    request = {"conn_id": conn_id, "release": release, "objects": [
        {"namespace": o.location.namespace, "owner": o.location.owner, "key": o.key} for o in objects]}
    try:
        done = subprocess.run([sys.executable, "-m", "airflow_ray_provider.ui.inspect"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=INSPECT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return InspectReport(error=f"no answer from the Ray cluster of connection {conn_id!r} "
                                   f"within {INSPECT_TIMEOUT_S:g}s")
    line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        return InspectReport(error=f"asking the Ray cluster of connection {conn_id!r} failed: "
                                   f"{(done.stderr or done.stdout)[-1500:]}")
    return InspectReport(**json.loads(line[len("RESULT "):]))


def _view(session: Any, dag_id: str, run_id: str, release: bool = False) -> RunView:
    found, refused = _run_objects(session, dag_id, run_id)
    view = RunView(dag_id, run_id, refused=refused)
    by_conn: dict[str, list[tuple[ObjectRow, RayObject]]] = {}
    for row, obj in found:
        by_conn.setdefault(obj.location.conn_id, []).append((row, obj))
    for conn_id, pairs in by_conn.items():
        report = _inspect(conn_id, [obj for _, obj in pairs], release)
        view.released += report.released
        view.clusters[conn_id] = {"store_used_bytes": report.store_used_bytes,
                                  "store_capacity_bytes": report.store_capacity_bytes, "error": report.error}
        for row, obj in pairs:
            held = report.held.get(held_id(obj.location.namespace, obj.location.owner, obj.key))
            if report.error is not None:
                row.status = "unknown"
            elif held is not None and not release:
                row.status, row.held_since = "in Ray", held.get("finished_at")
            else:
                row.status = "only in checkpoint" if row.checkpoint else "gone"
        view.objects.extend(row for row, _ in pairs)
    return view


@app.get("/runs/{dag_id}/{run_id}/objects",
         dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.XCOM))])
def run_objects(dag_id: str, run_id: str, session: SessionDep) -> dict[str, Any]:
    """The run's Ray objects and where each one is now."""
    return asdict(_view(session, dag_id, run_id))


CSRF_HEADER = "X-Airflow-Ray-CSRF"


def same_origin_only(request: Request) -> None:
    """Refuse a state-changing request that a page of another origin may have made the browser send.

    The session cookie goes with any request to this host, from any page of the same site (another port of
    the Airflow host: the Ray dashboard, Jupyter, Grafana), and SameSite=Lax does not stop a form posted from
    there. A form cannot set a header, and a script of another origin cannot send one without a CORS
    preflight this server does not grant; ``Sec-Fetch-Site`` says where the browser itself saw the request
    come from. A request with its own ``Authorization`` header (an API client's token) carries no cookie
    authority, so it needs neither.
    """
    if request.headers.get("authorization"):
        return
    site = request.headers.get("sec-fetch-site")
    if request.headers.get(CSRF_HEADER) != "1" or site not in (None, "same-origin"):
        raise HTTPException(403, f"Refused: a browser request to release Ray objects must come from the Ray tab "
                                 f"itself (the {CSRF_HEADER} header; Sec-Fetch-Site {site or 'absent'}), not from "
                                 f"another page")


@app.post("/runs/{dag_id}/{run_id}/release",
          dependencies=[Depends(same_origin_only), Depends(requires_access_dag("PUT", DagAccessEntity.RUN))])
def release_run(dag_id: str, run_id: str, session: SessionDep) -> dict[str, Any]:
    """Release the run's objects from Ray now; what has a checkpoint can still be restored from it."""
    from airflow.models.dagrun import DagRun

    if session.scalar(select(DagRun.id).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)) is None:
        raise HTTPException(404, f"DAG run {run_id!r} of DAG {dag_id!r} not found")
    return asdict(_view(session, dag_id, run_id, release=True))


@app.get("/view/{dag_id}/{run_id}", response_class=HTMLResponse,
         dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def run_page(dag_id: str, run_id: str) -> HTMLResponse:
    # The ids reach the page only as data (JSON in a script element, read by textContent).
    ids = json.dumps({"dag_id": dag_id, "run_id": run_id}).replace("<", "\\u003c")
    return HTMLResponse(PAGE.read_text().replace("__RUN_IDS__", ids))
