"""Apache Airflow provider that runs TaskFlow tasks on a Ray cluster.

Kept free of Airflow imports: it ships to Ray nodes with ``cluster/`` and ``exceptions.py``.
"""

import pkgutil

# In a Ray worker the shipped copy (bundle.py: this file, exceptions.py, cluster/) comes first on the
# path. Where the full provider is installed on the node too, its other modules (get_provider_info,
# which Airflow loads through the entry point whenever user code imports Airflow; hooks; xcom) are
# found in that copy: every ``airflow_ray_provider`` folder on sys.path joins the package's path.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.3.0"
