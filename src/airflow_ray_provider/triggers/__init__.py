"""Triggers of the deferrable mode: the triggerer waits for a Ray run without becoming a Ray driver.

The names are loaded lazily: ``python -m airflow_ray_provider.triggers.watcher`` imports this
package first, and importing Airflow here would run (and print from) Airflow's logging setup
before the watcher has moved its protocol channel off stdout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_ray_provider.triggers.ray import RayRunTrigger, sign_run

__all__ = ["RayRunTrigger", "sign_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from airflow_ray_provider.triggers import ray

        return getattr(ray, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
