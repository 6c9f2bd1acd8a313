"""Before the 0.2 re-layout the checkpoint API lived here; it is in ``airflow_ray_provider.cluster.checkpoint``."""

from airflow_ray_provider.moved import moved_names

__getattr__ = moved_names(__name__, dict.fromkeys(("current", "TaskCheckpoint"),
                                                  "airflow_ray_provider.cluster.checkpoint"))
