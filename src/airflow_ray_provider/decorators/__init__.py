"""``@task.ray``: the decorator (``ray.py``). The names below lived here before the 0.2 re-layout."""

from airflow_ray_provider.moved import moved_names

__getattr__ = moved_names(__name__, {"ray_task": "airflow_ray_provider.decorators.ray",
                                     "RayDecoratedOperator": "airflow_ray_provider.decorators.ray"})
