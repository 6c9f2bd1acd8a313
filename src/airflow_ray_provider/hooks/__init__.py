"""The ``ray`` connection's hook (``ray.py``). ``RayHook`` was importable from here before the 0.2 re-layout."""

from airflow_ray_provider.moved import moved_names

__getattr__ = moved_names(__name__, {"RayHook": "airflow_ray_provider.hooks.ray"})
