"""What differs between the Airflow versions the provider supports (3.2 and 3.3), in one place.

Airflow 3.3 brought the task state store (AIP-103) and ``ResumableJobMixin``, which make
``@task.ray`` durable: a retry re-attaches to the Ray task an earlier try submitted. On 3.2
the stand-in below submits a new Ray task on every try, which is what 3.2 users had before.
"""

from __future__ import annotations

from typing import Any

from airflow import __version__ as _airflow_version
from packaging.version import Version

AIRFLOW_V_3_3_PLUS = Version(Version(_airflow_version).base_version) >= Version("3.3.0")

if AIRFLOW_V_3_3_PLUS:
    from airflow.sdk import ResumableJobMixin
else:

    class ResumableJobMixin:  # type: ignore[no-redef]
        """Airflow 3.2: no task state store to resume from, so every try submits a new Ray task."""

        external_id_key: str = "remote_job_id"

        def __init__(self, *, durable: bool = True, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.durable = False
            self._durable_requested = durable

        def execute_resumable(self, context: Any) -> Any:
            if self._durable_requested:
                # Logged per try, not warned per DAG parse: durable is the default, so a warning would be noise.
                self.log.info("durable has no effect before Airflow 3.3 (no task state store): "  # type: ignore[attr-defined]
                              "this try submits a new Ray task")
            external_id = self.submit_job(context)  # type: ignore[attr-defined]
            self.poll_until_complete(external_id, context)  # type: ignore[attr-defined]
            return self.get_job_result(external_id, context)  # type: ignore[attr-defined]


__all__ = ["AIRFLOW_V_3_3_PLUS", "ResumableJobMixin"]
