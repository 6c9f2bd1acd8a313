"""The extra links to the Ray dashboard: its routes, and only Ray ids in them."""

from __future__ import annotations

from airflow_ray_provider.links.ray import RayNodeLink, RayPlace, RayTaskLink, RayWorkerLogsLink

NODE, JOB, TASK, WORKER = "ab" * 28, "01000000", "cd" * 24, "ef" * 28


def test_links_follow_the_dashboard_routes_and_take_only_ray_ids() -> None:
    place = RayPlace.from_events({"node_id": NODE, "job_id": JOB, "task_id": TASK, "worker_id": WORKER, "pid": 7})
    base = "http://dash:8265"
    assert RayTaskLink().url_for(base, place) == f"{base}/#/jobs/{JOB}/tasks/{TASK}"
    assert RayNodeLink().url_for(base, place) == f"{base}/#/cluster/nodes/{NODE}"
    assert RayWorkerLogsLink().url_for(base, place) == f"{base}/#/logs?nodeId={NODE}&fileName={WORKER}"
    # No dashboard, no place, or a value that is not a Ray id: no link (the UI shows it disabled).
    assert RayTaskLink().url_for(None, place) == "" and RayTaskLink().url_for(base, None) == ""
    odd = RayPlace.from_events({"node_id": NODE, "job_id": "x/../../evil", "task_id": "javascript:1",
                                "worker_id": WORKER.upper()})
    assert odd is not None and (odd.job_id, odd.task_id, odd.worker_id) == (None, None, None)
    assert RayTaskLink().url_for(base, odd) == "" and RayWorkerLogsLink().url_for(base, odd) == ""
    assert RayPlace.from_events({"node_id": "not-an-id"}) is None
    assert {link.xcom_key for link in (RayTaskLink(), RayNodeLink(), RayWorkerLogsLink())} == {
        "_link_RayTaskLink", "_link_RayNodeLink", "_link_RayWorkerLogsLink"}
