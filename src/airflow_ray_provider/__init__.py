"""Apache Airflow provider that runs TaskFlow tasks on a Ray cluster.

Kept free of Airflow imports: Ray workers import ``owner`` and ``worker`` from here.
"""

__version__ = "0.1.0"
