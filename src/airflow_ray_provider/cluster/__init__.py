"""The code that runs inside the Ray cluster: owner actors, the keeper, the task worker, checkpoints.

Nothing here imports Airflow (``tests/unit/test_layout.py`` checks it in a fresh interpreter). The
provider ships this package, with ``airflow_ray_provider/__init__.py`` and ``exceptions.py``, to
the cluster itself as a ``runtime_env`` ``py_modules`` entry (``airflow_ray_provider.bundle``), so
Ray nodes need only Ray and what the user's tasks import: no ``pip install`` of the provider.

- ``owner``: the detached owner actors that submit Ray tasks and hold their results.
- ``keeper``: the long-lived driver whose job owns the owners (keeps Ray workers warm).
- ``worker``: what runs inside each Ray task around the user's callable.
- ``checkpoint``: durable results and progress saves in object storage.
- ``describe``: a short, safe summary of a value (type, size, preview) for logs and XCom rows.
- ``signing``: HMAC signatures of references and manifests.
- ``ray_compat``: every private or experimental Ray API the provider touches.
"""
