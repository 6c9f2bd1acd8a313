"""Before the 0.2 re-layout ``load_result`` lived here; it is in ``airflow_ray_provider.xcom.results`` now."""

from airflow_ray_provider.moved import moved_names

__getattr__ = moved_names(__name__, {"load_result": "airflow_ray_provider.xcom.results",
                                     "latest_successful_run": "airflow_ray_provider.xcom.results",
                                     "ResultNotFound": "airflow_ray_provider.exceptions"})
