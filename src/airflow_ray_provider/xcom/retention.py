"""Garbage collection for Ray-held XComs: release what no XCom row needs any more.

Airflow calls the backend's ``purge`` when a task's XComs are cleared before a rerun,
but not when DAG runs (and their XCom rows) are deleted through the UI, the REST API
or ``airflow db clean``. This sweep closes that gap from the metadata DB's side, and
applies the retention: objects of runs that finished more than ``[ray] xcom_retention``
seconds ago are released too (their rows stay, and a later read says the object is gone).

Run it where the metadata DB is reachable: ``airflow-ray xcom gc`` (cron, or a sensor-free
maintenance job).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_ray_provider.config import DEFAULT_CONN_ID, xcom_retention
from airflow_ray_provider.exceptions import RayXComReferenceError
from airflow_ray_provider.xcom.reference import all_objects, parse_reference

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 600.0


@dataclass
class GcReport:
    """What one sweep saw and did."""

    referenced: int = 0  # objects named by XCom rows whose runs are within retention
    expired: int = 0  # objects named by rows of runs past retention
    held: int = 0  # objects the owner actors held before the sweep
    released: list[str] = field(default_factory=list)
    malformed_rows: int = 0

    def summary(self) -> str:
        return (f"owners held {self.held} object(s); {self.referenced} referenced by live XComs, {self.expired} "
                f"past retention; released {len(self.released)}; {self.malformed_rows} malformed row(s) skipped")


def _references(session: Any, now: float, retention_s: float) -> tuple[set[str], set[str], int, set[Any]]:
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from sqlalchemy import Text, cast, select

    rows = session.execute(
        select(XComModel.value, DagRun.end_date)
        .join(DagRun, DagRun.id == XComModel.dag_run_id)
        .where(cast(XComModel.value, Text).like('%"__airflow_ray__"%'))
    )
    live: set[str] = set()
    expired: set[str] = set()
    locations: set[Any] = set()
    malformed = 0
    for value, end_date in rows:
        try:
            ref = parse_reference(value)
        except RayXComReferenceError as exc:
            malformed += 1
            log.warning("Skipping a malformed Ray XCom reference: %s", exc)
            continue
        finished_long_ago = (end_date is not None and retention_s >= 0
                             and end_date.timestamp() < now - retention_s)
        for obj in all_objects(ref):
            (expired if finished_long_ago else live).add(obj.key)
            locations.add(obj.location)
    return live, expired - live, malformed, locations


def collect_garbage(*, conn_id: str = DEFAULT_CONN_ID, retention_s: float | None = None,
                    grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False, session: Any = None) -> GcReport:
    """Release objects held for ``conn_id``'s namespace that no live XCom row references.

    ``grace_s`` protects results whose XCom row is not written yet (a task that just finished).
    """
    from airflow_ray_provider.hooks.ray import RayHook

    if retention_s is None:
        retention_s = xcom_retention()
    now = time.time()
    if session is None:
        from airflow.utils.session import create_session

        with create_session() as own_session:
            live, expired, malformed, _ = _references(own_session, now, retention_s)
    else:
        live, expired, malformed, _ = _references(session, now, retention_s)
    hook = RayHook(conn_id)
    owners = hook.owners()
    settings = hook.settings
    report = GcReport(referenced=len(live), expired=len(expired), malformed_rows=malformed)
    for shard in range(settings.owner_shards):
        inventory: dict[str, dict[str, Any]] = owners.inventory(settings.namespace, shard)
        report.held += len(inventory)
        doomed = []
        for key, info in inventory.items():
            if info["state"] == "running" or key in live:
                continue
            finished_at = info.get("finished_at") or now
            # A durable run is held for the time its task instance may take to come back for it
            # (a retry re-attaches to the result its dead try never recorded in an XCom row).
            if key in expired or now - finished_at >= max(grace_s, float(info.get("hold_s") or 0.0)):
                doomed.append(key)
        if doomed and not dry_run:
            owners.release(doomed, settings.namespace, shard)
        report.released.extend(doomed)
    return report
