"""Operator extra links from a ``@task.ray`` task instance to the Ray dashboard: its Ray task, node and worker logs.

Airflow 3 evaluates ``get_link`` in the task's own process when the try ends and stores the URL as
an XCom (``_link_<class name>``); the UI and the REST API read that row back. So the URL is built
here from what this try saw (:class:`RayPlace`, reported by the Ray worker) and the dashboard's
address (:func:`airflow_ray_provider.hooks.ray.dashboard_url`); an API server never contacts Ray for it.

The routes are the dashboard's own (``python/ray/dashboard/client/src/App.tsx`` in Ray 2.58-2.60):
``#/jobs/<job>/tasks/<task>``, ``#/cluster/nodes/<node>``, and the logs list of a node filtered by
a file name (``#/logs?nodeId=<node>&fileName=<worker id>``: the worker's ``.out`` and ``.err``).
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlencode

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.models.taskinstancekey import TaskInstanceKey

# Ray's ids are hex strings (NodeID 56 chars, TaskID 48, JobID 8, WorkerID 56); nothing else goes in a URL.
_RAY_ID = re.compile(r"[0-9a-f]{8,128}")


def _ray_id(value: Any) -> str | None:
    return value if isinstance(value, str) and _RAY_ID.fullmatch(value) else None


@dataclass(frozen=True)
class RayPlace:
    """Where one Ray task ran, by the ids the Ray dashboard uses (None: not reported or not an id)."""

    node_id: str | None
    job_id: str | None
    task_id: str | None
    worker_id: str | None

    @classmethod
    def from_events(cls, events: Mapping[str, Any]) -> RayPlace | None:
        """The place the Ray worker reported in its first event (``cluster.worker.run_callable``)."""
        place = cls(*(_ray_id(events.get(name)) for name in ("node_id", "job_id", "task_id", "worker_id")))
        return place if place.node_id else None


class RayDashboardLink(BaseOperatorLink):
    """A link into the Ray dashboard for the Ray task this try ran; empty when there is no dashboard to link to.

    Reads ``ray_place`` and ``ray_dashboard_url``, which :class:`RayPythonOperator` sets when its Ray
    task starts (also after a re-attach or a deferral).
    """

    name: ClassVar[str] = "Ray dashboard"

    @abstractmethod
    def route(self, place: RayPlace) -> str | None:
        """The dashboard route (the part after ``#/``) for ``place``, or None when its ids are missing."""

    def url_for(self, base: str | None, place: RayPlace | None) -> str:
        """The page under the dashboard ``base`` for ``place``; empty when either is unknown."""
        route = self.route(place) if base and isinstance(place, RayPlace) else None
        return f"{base}/#/{route}" if route else ""

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        return self.url_for(getattr(operator, "ray_dashboard_url", None), getattr(operator, "ray_place", None))


class RayTaskLink(RayDashboardLink):
    name = "Ray task"

    def route(self, place: RayPlace) -> str | None:
        if not (place.job_id and place.task_id):
            return None
        return f"jobs/{quote(place.job_id)}/tasks/{quote(place.task_id)}"


class RayNodeLink(RayDashboardLink):
    name = "Ray node"

    def route(self, place: RayPlace) -> str | None:
        return f"cluster/nodes/{quote(place.node_id)}" if place.node_id else None


class RayWorkerLogsLink(RayDashboardLink):
    name = "Ray worker logs"

    def route(self, place: RayPlace) -> str | None:
        if not (place.node_id and place.worker_id):
            return None
        return "logs?" + urlencode({"nodeId": place.node_id, "fileName": place.worker_id})


RAY_LINKS: tuple[RayDashboardLink, ...] = (RayTaskLink(), RayNodeLink(), RayWorkerLogsLink())
