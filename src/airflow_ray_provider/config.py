"""The ``[ray]`` section of the Airflow configuration: every option's getter and default, in one place.

Getters read the configuration each time they are called (no cache): tests and long-lived
processes see a changed ``AIRFLOW__RAY__*`` value at once, and reading it costs microseconds.
The options are declared for the UI and ``airflow config list`` in ``get_provider_info.py``,
whose defaults come from the constants here.

``[ray] secret_key`` (``AIRFLOW__RAY__SECRET_KEY``) signs every XCom reference and
checkpoint manifest. Like ``[core] fernet_key``, every component that runs tasks or
reads results (scheduler-side workers, Celery workers, triggerer, notebooks using
``load_result``) must have the same value. Without it, a key is generated once per
``$AIRFLOW_HOME`` into ``$AIRFLOW_HOME/ray/secret_key`` (mode 0600): right for one
machine, wrong for a multi-host deployment, where the value must be set explicitly.
"""

from __future__ import annotations

import functools
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from airflow_ray_provider.cluster.signing import MIN_SECRET_BYTES
from airflow_ray_provider.exceptions import SigningError

SECRET_FILE = "secret_key"
MIN_SECRET_DISTINCT = 8  # secrets.token_hex gives 16 distinct characters in 64; a typed phrase more
SECTION = "ray"

DEFAULT_CONN_ID = "ray_default"  # the ``ray`` connection a task, the backend and the CLI use unless told
DEFAULT_XCOM_THRESHOLD = 1024 * 1024  # bytes: smaller results are stored in the metadata DB as usual
DEFAULT_XCOM_RETENTION_S = 86_400.0  # how long a run's objects stay in Ray after the run ends
DEFAULT_GC_INTERVAL_S = 300.0  # how often the scheduler plugin starts ``airflow-ray upkeep``
DEFAULT_CHECKPOINT_RETENTION_S = -1.0  # negative: checkpoints are never pruned
DEFAULT_CHECKPOINT_FOLDER = "ray-checkpoints"  # under $AIRFLOW_HOME when no checkpoint_path is set


def _conf() -> Any:
    from airflow.sdk.configuration import conf

    return conf


def xcom_conn_id() -> str:
    """``[ray] xcom_conn_id``: the connection the XCom backend and its garbage collection use."""
    return _conf().get(SECTION, "xcom_conn_id", fallback=DEFAULT_CONN_ID) or DEFAULT_CONN_ID


def xcom_threshold() -> int:
    """``[ray] xcom_threshold``: results of ``@task.ray`` below this many bytes go to the DB."""
    return _conf().getint(SECTION, "xcom_threshold", fallback=DEFAULT_XCOM_THRESHOLD)


def xcom_retention() -> float:
    """``[ray] xcom_retention``: seconds a finished run's objects stay in Ray."""
    return _conf().getfloat(SECTION, "xcom_retention", fallback=DEFAULT_XCOM_RETENTION_S)


def xcom_gc_interval() -> float:
    """``[ray] xcom_gc_interval``: seconds between upkeep runs (negative: never)."""
    return _conf().getfloat(SECTION, "xcom_gc_interval", fallback=DEFAULT_GC_INTERVAL_S)


def ship_cluster_code() -> bool:
    """``[ray] ship_cluster_code``: ship the cluster-side package with every driver (``bundle.py``)."""
    return _conf().getboolean(SECTION, "ship_cluster_code", fallback=True)


def preload_modules() -> bool:
    """``[ray] preload_modules``: the scheduler imports Ray before it forks LocalExecutor task processes."""
    return _conf().getboolean(SECTION, "preload_modules", fallback=True)


def default_deferrable() -> bool:
    """``[ray] default_deferrable``: ``@task.ray`` tasks defer to the triggerer while Ray works, unless told."""
    return _conf().getboolean(SECTION, "default_deferrable", fallback=False)


def checkpoint_path() -> str:
    """``[ray] checkpoint_path``, else ``$AIRFLOW_HOME/ray-checkpoints``."""
    configured = _conf().get(SECTION, "checkpoint_path", fallback="") or ""
    return configured or os.path.join(os.path.abspath(airflow_home()), DEFAULT_CHECKPOINT_FOLDER)


def checkpoint_retention() -> float:
    """``[ray] checkpoint_retention``: seconds to keep checkpoints (negative: forever)."""
    return _conf().getfloat(SECTION, "checkpoint_retention", fallback=DEFAULT_CHECKPOINT_RETENTION_S)


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


def secret_key() -> bytes:
    """The deployment's signing secret: ``[ray] secret_key``, else the generated key file."""
    configured = _conf().get(SECTION, "secret_key", fallback="") or ""
    return _secret(configured, str(airflow_home()))


@functools.cache
def _secret(configured: str, home: str) -> bytes:
    if configured:
        value = configured.encode()
        advice = "(python -c 'import secrets; print(secrets.token_hex(32))')"
        if len(value) < MIN_SECRET_BYTES:
            raise SigningError(f"[ray] secret_key is {len(value)} bytes long; use at least {MIN_SECRET_BYTES} "
                               f"random characters {advice}")
        if len(set(value)) < MIN_SECRET_DISTINCT:  # 32 spaces, "aaaa…": long enough, and guessable
            raise SigningError(f"[ray] secret_key has {len(set(value))} distinct character(s) in its "
                               f"{len(value)}: it is not random; use a random key {advice}")
        return value
    return _key_file(Path(home) / "ray" / SECRET_FILE)


def _key_file(path: Path) -> bytes:
    """Read the generated key, creating it first.

    It is written to a private temp file and hard-linked into place, which fails if the
    file exists: concurrent first callers agree on one key, and nobody reads a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningError(f"The signing key file {path} must belong to this user and have mode 0600 "
                           f"(it has {stat.filemode(info.st_mode)}); fix it or set [ray] secret_key")
    value = path.read_bytes().strip()
    if len(value) < MIN_SECRET_BYTES:
        raise SigningError(f"The signing key file {path} holds {len(value)} bytes, fewer than {MIN_SECRET_BYTES}; "
                           f"set [ray] secret_key, or replace the file (results signed with the old key are "
                           f"then refused)")
    return value
