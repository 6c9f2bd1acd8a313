"""What the provider ships to the Ray cluster: its cluster-side code, as a ``runtime_env`` py_module.

A stock Ray node (``rayproject/ray``, or any node with only Ray and the user's libraries) cannot
import ``airflow_ray_provider.cluster``. So the driver's ``ray.init`` carries
``runtime_env={"py_modules": [<staged copy>]}``: Ray zips the staged folder once, stores it in
the cluster under a content hash (``gcs://_ray_pkg_<hash>.zip``) and puts it first on the
``PYTHONPATH`` of every worker, actor and task of the job; the owner actors and the keeper
inherit it, and so do the tasks they submit. A node that has the provider installed runs the
shipped copy too, so client and cluster always run the same provider code.

Only ``__init__.py``, ``exceptions.py`` and ``cluster/`` are staged (:data:`SHIPPED`): the Airflow
side never reaches the cluster. The staged copy lives under ``$AIRFLOW_HOME/ray/bundle`` (a
private 0700 folder: it is code the cluster will run) and is re-checked against the installed
sources on each use; ``[ray] ship_cluster_code = False`` turns shipping off for clusters whose
nodes have the provider installed and do not accept uploads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

PACKAGE = "airflow_ray_provider"
SHIPPED = ("__init__.py", "exceptions.py", "cluster")
_SOURCE = Path(__file__).resolve().parent


def source_files(root: Path = _SOURCE) -> list[Path]:
    """The shipped files, relative to the package folder, in a stable order."""
    files: list[Path] = []
    for name in SHIPPED:
        path = root / name
        if path.is_dir():
            # Python and the gateway's published schema (cluster/openapi.json), nothing a build left behind.
            files.extend(p.relative_to(root) for p in sorted(path.rglob("*"))
                         if p.suffix in (".py", ".json") and "__pycache__" not in p.parts)
        else:
            files.append(Path(name))
    return files


def digest(root: Path = _SOURCE) -> str:
    h = hashlib.sha256()
    for rel in source_files(root):
        h.update(str(rel).encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def _staged(source_digest: str, home: str) -> str:
    from airflow_ray_provider.local_cluster import ensure_private_dir

    base = ensure_private_dir(Path(home) / "ray" / "bundle")
    target = base / source_digest[:20]
    package = target / PACKAGE
    if _is_copy(package, source_digest):
        return str(package)
    # Task processes that start at once all stage: a copy appears or goes only by rename (atomic), and a
    # good copy another process staged meanwhile is never replaced (seen under the scheduler: two processes
    # removing the same copy at once, and one failing the task with FileNotFoundError).
    scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=base))
    try:
        for rel in source_files():
            (scratch / PACKAGE / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_SOURCE / rel, scratch / PACKAGE / rel)
        if _is_copy(package, source_digest):
            return str(package)
        if target.exists():  # a stale or altered copy: moved aside, then removed
            trash = Path(tempfile.mkdtemp(prefix=".stale-", dir=base))
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.rename(target, trash / "copy")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(scratch, target)
        except OSError:  # another process staged the same digest first
            if not _is_copy(package, source_digest):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(package)


def package_zip(*extra: ModuleType) -> bytes:
    """The shipped files under ``airflow_ray_provider/``, and each of ``extra`` (a pure-Python package) under its
    own name, as one zip in the layout Ray's ``py_modules`` unpacks onto a worker's path. The same sources give the
    same bytes (fixed timestamps and order), so the zip can be named by its content."""
    entries = [(f"{PACKAGE}/{rel}", _SOURCE / rel) for rel in source_files()]
    for module in extra:
        root = Path(module.__file__ or "").parent
        entries += [(f"{module.__name__}/{p.relative_to(root)}", p) for p in sorted(root.rglob("*.py"))
                    if "__pycache__" not in p.parts]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _is_copy(package: Path, source_digest: str) -> bool:
    """Whether ``package`` is a whole copy of the source (False while another process replaces it)."""
    try:
        return package.is_dir() and digest(package) == source_digest
    except OSError:
        return False


def bundle_dir() -> str:
    """The staged copy of the shipped files (a folder named ``airflow_ray_provider``)."""
    from airflow_ray_provider.config import airflow_home

    return _staged(digest(), str(airflow_home()))


def driver_runtime_env() -> dict[str, Any]:
    """The job-level ``runtime_env`` for ``ray.init``: the bundle, unless shipping is turned off."""
    from airflow_ray_provider.config import ship_cluster_code

    return {"py_modules": [bundle_dir()]} if ship_cluster_code() else {}
