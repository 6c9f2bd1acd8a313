"""The Ray XCom backend (``AIRFLOW__CORE__XCOM_BACKEND=airflow_ray_provider.xcom.RayXComBackend``) and its records."""

from airflow_ray_provider.xcom.backend import RayXComBackend

__all__ = ["RayXComBackend"]
