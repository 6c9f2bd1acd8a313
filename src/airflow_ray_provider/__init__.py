"""Apache Airflow provider that runs TaskFlow tasks on a Ray cluster.

Kept free of Airflow imports: it ships to Ray nodes with ``cluster/`` and ``exceptions.py``.
"""

__version__ = "0.2.0"
