"""The ``[ray]`` settings of the Airflow configuration that the provider's security depends on.

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

from airflow_ray_provider.signing import MIN_SECRET_BYTES, SigningError

SECRET_FILE = "secret_key"


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


def secret_key() -> bytes:
    """The deployment's signing secret: ``[ray] secret_key``, else the generated key file."""
    from airflow.sdk.configuration import conf

    configured = conf.get("ray", "secret_key", fallback="") or ""
    return _secret(configured, str(airflow_home()))


@functools.cache
def _secret(configured: str, home: str) -> bytes:
    if configured:
        value = configured.encode()
        if len(value) < MIN_SECRET_BYTES:
            raise SigningError(f"[ray] secret_key is {len(value)} bytes long; use at least {MIN_SECRET_BYTES} "
                               f"random characters (python -c 'import secrets; print(secrets.token_hex(32))')")
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
