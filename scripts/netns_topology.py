"""docker-compose.yaml's topology as separate hosts: Linux namespaces joined by veth pairs on a bridge.

Used by tests/system/deployment/test_netns_topology.py (needs root). Where scripts/local_topology.py puts every
component on one loopback, here each host is its own network namespace (``ip netns``) with one address on a
private /24, plus its own PID namespace and mount namespace, so that it cannot lean on the others:

- ``airflow`` (.10): api-server, scheduler, dag-processor, two Celery workers, the Redis broker and a
  PostgreSQL cluster of its own, and a zero-CPU Ray node that the Airflow workers' drivers attach to;
- ``rayhead`` (.11): the Ray head (resource ``head_node``), token auth;
- ``rayworker`` (.12): a Ray node joined with ``ray start --address`` (resource ``worker_node``);
- ``s3`` (.13): SeaweedFS (``weed mini``) as the checkpoint store;
- ``client`` (.2): only a network namespace, entered by one thread of the calling process
  (``ClientNet``) for the REST API, SQL and S3 calls of the test itself.

Why more than a network namespace per host (together, about what a container gets):

- PID: a Ray driver finds "its" node by listing the raylet processes it can see
  (``ray._private.services.find_node_ids``) and prefers the head among them; with a shared PID
  namespace an Airflow worker would attach to the head's raylet through its unix socket, i.e.
  through the shared disk, even though the head is another host.
- Mount: each host gets private tmpfs on ``/tmp`` and ``/dev/shm`` (Ray's object store), an empty
  private tmpfs over every other host's directory, and the repository (code and venv, like a
  container image) read-only. Anything that only worked because two hosts share a file fails.
- UTS: its own hostname, and an /etc/hosts naming every host by its 10.x address (the machine's own
  /etc/hosts maps its hostname to 127.0.0.1, so every host would otherwise call itself "localhost").

Every address handed out is a 10.x one. Redis, PostgreSQL and the api-server bind the airflow host's
address only, so even a same-host client configured with 127.0.0.1 fails; SeaweedFS binds the s3
host's address (plus a loopback listener of its own) and Ray's servers all of their host's interfaces,
as Ray does. Loopback in a namespace reaches only that namespace, so a component that tried 127.0.0.1
for another host's service simply fails. Nothing is routed outside the namespaces (the
bridge has no uplink and no host has a default route). A fresh namespace has no other listeners, so
the ports below are fixed rather than probed (never 6379 or 8080, as in local_cluster.free_ports).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from airflow_ray_provider.local_cluster import LOOPBACK_ONLY_ENV, RAY_SYSTEM_ENV, ray_process_env
from scripts.local_topology import (
    ROOT,
    WORKER_NAME_ENV,
    Airflow,
    Api,
    Component,
    TopologyError,
    marked_nodes,
    start,
    stop_all,
)

P = ParamSpec("P")
R = TypeVar("R")

# 10.213.77.0/24: a private range unlikely to be in use; it only exists inside our namespaces anyway.
SUBNET = "10.213.77"
PREFIX_LEN = 24
HOST_NUMBERS = {"client": 2, "airflow": 10, "rayhead": 11, "rayworker": 12, "s3": 13}
SERVICE_HOSTS = ("airflow", "rayhead", "rayworker", "s3")  # the ones with processes (client has none)

GCS_PORT = 6380  # as in docker-compose.yaml; not 6379, Redis's port
NODE_MANAGER_PORT = 6381
OBJECT_MANAGER_PORT = 6382
REDIS_PORT = 6390
PG_PORT = 5432
API_PORT = 8090
S3_PORT = 8333
BUCKET = "airflow-ray-ckpt"
S3_ACCESS_KEY = "ckpt"  # the one identity SeaweedFS serves (start_seaweedfs), the ckpt_s3 connection's login
PG_USER = "postgres"  # initdb refuses to run as root: PostgreSQL runs as this (existing) system user

CLONE_NEWNET = 0x40000000
LOOPBACK_PREFIXES = ("127.", "::1", "::ffff:127.")

# PID 1 of a host's PID namespace: makes the host's mounts, says "ready", then reaps orphans (PID 1
# inherits them; without reaping, a host that runs Ray would fill up with zombies).
_INIT = """\
import json, os, subprocess, sys, time
for argv in json.loads(sys.argv[1]):
    subprocess.run(argv, check=True)
print("ready", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
"""


def missing_tools() -> list[str]:
    """What this topology needs and this machine lacks (the test skips naming them)."""
    needed = {"ip": "ip", "nsenter": "nsenter", "unshare": "unshare", "mount": "mount", "runuser": "runuser",
              "redis-server": "redis-server", "initdb": "initdb", "postgres": "postgres", "weed": "weed"}
    path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", os.environ.get("PATH", "")])
    return [name for name, binary in needed.items() if shutil.which(binary, path=path) is None]


def tool(binary: str) -> str:
    path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", os.environ.get("PATH", "")])
    found = shutil.which(binary, path=path)
    if found is None:
        raise TopologyError(f"{binary} not found")
    return found


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise TopologyError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


# -- the network --------------------------------------------------------------------------------
@dataclass
class Network:
    """A bridge in a 'switch' namespace and one veth pair per host namespace; no uplink, no routes out."""

    prefix: str = field(default_factory=lambda: f"arp{os.getpid()}")
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def netns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @staticmethod
    def address(host: str) -> str:
        return f"{SUBNET}.{HOST_NUMBERS[host]}"

    def host_of(self, ip: str) -> str | None:
        ip = ip.removeprefix("::ffff:")
        return next((h for h in HOST_NUMBERS if self.address(h) == ip), None)

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)  # recorded at once, so destroy() removes it whatever fails next
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def create(self) -> None:
        self._add_netns(self.switch)
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for host in HOST_NUMBERS:
            ns = self.netns(host)
            self._add_netns(ns)
            # Created in the switch namespace with the peer moved straight into the host's: no link
            # ever exists in the machine's own namespace.
            port = f"p-{host}"[:15]
            _run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                  "netns", ns])
            _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(host)}/{PREFIX_LEN}", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def destroy(self) -> list[str]:
        """Delete every namespace made (a veth goes with its namespace); returns what could not be deleted."""
        failed = []
        for name in reversed(self.namespaces):
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, timeout=30)
            if done.returncode != 0 and name in _run(["ip", "netns", "list"]).stdout.split():
                failed.append(f"{name}: {done.stderr.strip()}")
        self.namespaces.clear()
        return failed


# -- hosts --------------------------------------------------------------------------------------
@dataclass
class Host:
    """One machine: a network namespace plus its own PID and mount namespaces (see the module doc)."""

    name: str
    netns: str
    address: str
    disk: Path  # its own working directory; every other host sees an empty tmpfs there
    init: Component | None = None
    init_pid: int = 0  # PID 1 of the host's PID namespace, as this process sees it

    @property
    def logs(self) -> Path:
        return self.disk / "logs"

    @property
    def home(self) -> Path:
        return self.disk / "home"

    def boot(self, other_disks: list[Path], timeout: float = 30.0) -> None:
        for path in (self.disk, self.logs, self.home, *other_disks):  # mount points must exist
            path.mkdir(parents=True, exist_ok=True)
        # Its own hostname (UTS namespace) and /etc/hosts naming every host by its 10.x address, as Docker's
        # DNS would: the machine's /etc/hosts maps its hostname to 127.0.0.1, so socket.getfqdn() (Celery's %h,
        # Airflow's hostname_callable) would otherwise give "localhost" on every host.
        etc_hosts = self.disk / "etc-hosts"
        etc_hosts.write_text("127.0.0.1 localhost\n" + "".join(
            f"{Network.address(name)} {name}\n" for name in HOST_NUMBERS))
        mounts = [
            ["hostname", self.name],
            ["mount", "--bind", str(etc_hosts), "/etc/hosts"],
            ["mount", "-t", "tmpfs", "-o", "mode=1777,size=2g", "tmpfs", "/tmp"],
            ["mount", "-t", "tmpfs", "-o", "mode=1777,size=3g", "tmpfs", "/dev/shm"],
            *(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", str(d)] for d in other_disks),
            ["mount", "--bind", "-o", "ro", str(ROOT), str(ROOT)],
        ]
        # ip netns exec -> unshare: new PID, UTS and mount namespaces (private propagation: nothing leaks back to
        # the machine); --kill-child: the host dies with the unshare process we signal.
        self.init = start(f"{self.name}-init", [
            "ip", "netns", "exec", self.netns, "unshare", "--pid", "--uts", "--fork", "--mount-proc", "--propagation",
            "private", "--kill-child", sys.executable, "-c", _INIT, json.dumps(mounts),
        ], {**os.environ}, self.logs, self.disk)
        deadline = time.monotonic() + timeout
        while "ready" not in self.init.log.read_text(errors="replace"):
            if self.init.proc.poll() is not None or time.monotonic() > deadline:
                raise TopologyError(f"host {self.name} did not come up\n{self.init.tail()}")
            time.sleep(0.1)
        import psutil

        children = psutil.Process(self.init.proc.pid).children()
        if len(children) != 1:
            raise TopologyError(f"host {self.name}: expected one init process, found {children}")
        self.init_pid = children[0].pid

    def argv(self, argv: list[str], user: str | None = None) -> list[str]:
        """``argv`` run on this host (as ``user``, else root)."""
        entered = ["nsenter", f"--target={self.init_pid}", "--net", "--mount", "--pid", "--uts",
                   f"--wd={self.disk}", "--"]
        return [*entered, *(["runuser", "-u", user, "--"] if user else []), *argv]

    def start(self, name: str, argv: list[str], env: dict[str, str], user: str | None = None,
              logs: Path | None = None) -> Component:
        return start(f"{self.name}-{name}", self.argv(argv, user), env, logs or self.logs, self.disk)

    def run(self, argv: list[str], env: dict[str, str] | None = None, user: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv, user), env=env if env is not None else host_env(self),
                              cwd=self.disk, capture_output=True, text=True, timeout=timeout)

    def alive(self) -> bool:
        return self.init is not None and self.init.proc.poll() is None

    def crash(self) -> None:
        """The host dies at once: SIGKILL to its PID namespace's init, and the kernel kills every process in it."""
        os.kill(self.init_pid, signal.SIGKILL)
        assert self.init is not None
        self.init.proc.wait(timeout=30)

    def tcp(self) -> list[tuple[str, int, str, int, str]]:
        """``(local ip, port, remote ip, port, state)`` of every TCP socket in this host's network namespace."""
        rows = []
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                lines = Path(f"/proc/{self.init_pid}/net/{table}").read_text().splitlines()[1:]
                for line in lines:
                    cols = line.split()
                    (lip, lport), (rip, rport) = (_hex_address(c) for c in cols[1:3])
                    rows.append((lip, lport, rip, rport, _TCP_STATES.get(cols[3], cols[3])))
        return rows


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
               "0B": "CLOSING"}


def _hex_address(text: str) -> tuple[str, int]:
    """``/proc/net/tcp{,6}``'s ``HEX_IP:HEX_PORT`` (the IP in host byte order, 32-bit words) as ``(ip, port)``."""
    ip_hex, port_hex = text.split(":")
    raw = bytes.fromhex(ip_hex)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words), int(port_hex, 16)


def host_env(host: Host, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The calling environment for a process of ``host``: its own HOME, and none of the switches or
    tokens the calling process may carry (a loopback-only switch would make Ray drivers dial 127.0.0.1)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LOOPBACK_ONLY_ENV and not k.startswith(("RAY_AUTH_", "AIRFLOW_CONN_"))}
    return {**env, **(extra or {}), "HOME": str(host.home)}


# -- the calling process's seat on the network --------------------------------------------------
class ClientNet:
    """One thread of this process moved into the client namespace (setns acts per thread for networks):
    every socket it opens is on the veth network, so the test talks to the hosts as a remote client would."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns-client",
                                        initializer=self._enter)
        self.run(lambda: None)  # fail here, not in the first real call, if setns is refused

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.netns}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class ClientApi(Api):
    """``local_topology.Api`` whose requests leave from the client namespace."""

    def __init__(self, base: str, diagnostics: Callable[[], str], net: ClientNet) -> None:
        super().__init__(base, diagnostics)
        self.net = net

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.net.run(super().call, method, path, body)


def pg_query(net: ClientNet, host: str, dbname: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run SQL on the airflow host's PostgreSQL from the client namespace (rows, or [] for statements)."""

    def query() -> list[tuple[Any, ...]]:
        import psycopg2

        conn = psycopg2.connect(host=host, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    return net.run(query)


def s3_client(endpoint: str, secret_key: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=secret_key,
                        region_name="us-east-1")


def s3_keys(net: ClientNet, endpoint: str, secret_key: str, prefix: str = "") -> list[str]:
    def keys() -> list[str]:
        pages = s3_client(endpoint, secret_key).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    return net.run(keys)


def reachable(net: ClientNet, host: str, port: int) -> bool:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=2):
                return True
        except OSError:
            return False

    return net.run(probe)


# -- watching the wires -------------------------------------------------------------------------
@dataclass
class Wiretap:
    """Samples every host's TCP table (``/proc/<init>/net/tcp*``) in the background.

    TIME_WAIT entries outlive a closed connection by a minute, so even short S3 requests are seen.
    """

    network: Network
    hosts: dict[str, Host]
    interval: float = 0.5
    seen: set[tuple[str, str, int, str, int, str]] = field(default_factory=set)
    listening: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        for name, host in self.hosts.items():
            if not host.alive():
                continue
            for lip, lport, rip, rport, state in host.tcp():
                if state == "LISTEN":
                    self.listening.setdefault(name, set()).add((lip, lport))
                else:
                    self.seen.add((name, lip, lport, rip, rport, state))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="netns-wiretap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _serves(self, host: str, ip: str, port: int) -> bool:
        return any(p == port and (i == ip or i in ("0.0.0.0", "::")) for i, p in self.listening.get(host, ()))

    def flows(self) -> set[tuple[str, str, int]]:
        """``(client host, server host, server port)`` of every connection seen between two hosts."""
        found = set()
        for host, lip, lport, rip, rport, _state in self.seen:
            peer = self.network.host_of(rip)
            if peer is None or peer == host:
                continue
            if self._serves(host, lip, lport):
                found.add((peer, host, lport))
            else:
                found.add((host, peer, rport))
        return found

    def loopback(self) -> set[tuple[str, str, int, str, int, str]]:
        """Connections seen on loopback (each stays inside its own host, by construction)."""
        return {c for c in self.seen if c[3].startswith(LOOPBACK_PREFIXES)}


# -- services -----------------------------------------------------------------------------------
def start_redis(host: Host) -> Component:
    data = host.disk / "redis"
    data.mkdir(exist_ok=True)
    return host.start("redis", [tool("redis-server"), "--port", str(REDIS_PORT), "--bind", host.address,
                                "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(data)],
                      host_env(host))


def start_postgres(host: Host, client_subnet: str) -> Component:
    """A private PostgreSQL cluster (initdb as PG_USER, which owns the directory) listening on the host's
    address only (no unix socket): trust auth for the private subnet, like the machine's own server."""
    import pwd

    data = host.disk / "pgdata"
    data.mkdir(exist_ok=True)
    user = pwd.getpwnam(PG_USER)
    os.chown(data, user.pw_uid, user.pw_gid)
    os.chmod(data, 0o700)
    done = host.run([tool("initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust", "-E", "UTF8", "--no-sync"],
                    user=PG_USER, timeout=120)
    if done.returncode != 0:
        raise TopologyError(f"initdb failed: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {client_subnet} trust\n")
    return host.start("postgres", [
        tool("postgres"), "-D", str(data), "-p", str(PG_PORT), "-c", f"listen_addresses={host.address}",
        "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off", "-c", "max_connections=200",
    ], host_env(host), user=PG_USER)


def start_seaweedfs(host: Host, secret_key: str) -> Component:
    """SeaweedFS serving S3 to one identity (``S3_ACCESS_KEY`` / ``secret_key``), as a real store would.

    Not without identities: SeaweedFS 4.48 then takes most requests unsigned, but refuses the signed
    UploadPart of pyarrow's S3 client ("The access key ID you provided does not exist in our records"),
    which the checkpoint data files use.
    """
    data = host.disk / "weed"
    data.mkdir(exist_ok=True)
    config = host.disk / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "airflow-ray-netns", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": secret_key}]}]}))
    config.chmod(0o600)
    return host.start("seaweedfs", [
        tool("weed"), "mini", f"-dir={data}", f"-ip={host.address}", f"-ip.bind={host.address}",
        f"-s3.port={S3_PORT}", "-master.port=9333", "-volume.port=9340", "-filer.port=8888",
        "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        f"-bucket={BUCKET}", f"-s3.config={config}",
    ], host_env(host))


def start_ray(host: Host, token: str, resources: dict[str, float], num_cpus: int, object_store_mb: int,
              head: Host | None = None, attempts: int = 3, timeout: float = 150.0) -> Component:
    """``ray start --block`` on ``host``: the head when ``head`` is None, else a node joining ``head``;
    returns once Ray says the node runs.

    Each node advertises its own address and keeps its own ``--temp-dir`` (without one a joining node
    takes the head's temp dir path). Every node runs with the head's token (``ray_process_env``).
    ``ray start`` gives its raylet a fixed 30 s to register (node.py, ``raylet_start_wait_time_s``),
    which a loaded 2-core machine misses now and then: a failed start is stopped and tried again."""
    failures = []
    for attempt in range(1, attempts + 1):
        node = _ray_start(host, token, resources, num_cpus, object_store_mb, head, f"ray-{attempt}")
        deadline = time.monotonic() + timeout
        while "Ray runtime started." not in node.log.read_text(errors="replace"):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        else:
            return node
        stop_all([node], sig_first=signal.SIGKILL)
        failures.append(node.tail(15))
        for log in sorted((host.disk / "ray").glob("session_*/logs/raylet.out"))[-1:]:
            failures.append(f"--- {log} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    raise TopologyError(f"Ray did not start on {host.name} in {attempts} attempts\n" + "\n".join(failures))


def _ray_start(host: Host, token: str, resources: dict[str, float], num_cpus: int, object_store_mb: int,
               head: Host | None, name: str) -> Component:
    argv = [tool("ray"), "start", "--block", f"--node-ip-address={host.address}",
            f"--temp-dir={host.disk / 'ray'}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
            f"--object-store-memory={object_store_mb * 1024 * 1024}", f"--node-manager-port={NODE_MANAGER_PORT}",
            f"--object-manager-port={OBJECT_MANAGER_PORT}", "--disable-usage-stats"]
    if head is None:
        argv += ["--head", f"--port={GCS_PORT}", "--include-dashboard=false"]
    else:
        argv += [f"--address={head.address}:{GCS_PORT}"]
    return host.start(name, argv, host_env(host, {**ray_process_env(token), **RAY_SYSTEM_ENV}))


_NODES = ("import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
          "print('NODES ' + json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], "
          "'resources': n['Resources']} "
          "for n in ray.nodes() if n['Alive']]))")


def ray_nodes_from(host: Host, address: str, token: str) -> list[dict[str, Any]]:
    """The cluster's live nodes, asked by a throwaway driver on ``host`` (which must run a Ray node:
    a driver attaches to a raylet of its own host). local_topology.ray_nodes would ask from here."""
    done = host.run([sys.executable, "-c", _NODES, address], env=host_env(host, ray_process_env(token)), timeout=120)
    if done.returncode != 0:
        raise TopologyError(f"cannot list the nodes of {address} from {host.name}: {done.stderr[-3000:]}")
    return marked_nodes(done.stdout)


# -- Airflow ------------------------------------------------------------------------------------
def airflow_env(airflow: Airflow, host: Host) -> dict[str, str]:
    """``Airflow.env`` on ``host``: API and execution API on the host's address, nothing inherited that
    points elsewhere (another test's connections, a loopback switch, a token)."""
    env = airflow.env
    return {k: v for k, v in env.items()
            if k not in LOOPBACK_ONLY_ENV and not k.startswith("RAY_AUTH_")
            and (not k.startswith("AIRFLOW_CONN_") or k in airflow.extra_env)}


def start_airflow(airflow: Airflow, host: Host, celery_workers: int, startup_timeout: float = 240.0) -> None:
    """``Airflow.start`` with every component on ``host`` (the api-server bound to the host's address)."""
    env = airflow_env(airflow, host)

    def launch(name: str, args: list[str], extra: dict[str, str] | None = None) -> None:
        airflow.components.append(host.start(name, [sys.executable, "-m", "airflow", *args], {**env, **(extra or {})},
                                             logs=airflow.logs))

    launch("api-server", ["api-server", "--host", host.address, "--port", str(airflow.port), "--workers", "1"])
    launch("scheduler", ["scheduler"])
    launch("dag-processor", ["dag-processor"])
    for n in range(1, celery_workers + 1):
        name = f"celery-worker-{n}"
        launch(name, ["celery", "worker", "--queues", airflow.queue, "--concurrency", "1",
                      "--celery-hostname", f"{name}@%h", "--without-mingle", "--without-gossip"],
               {WORKER_NAME_ENV: name})
    airflow.wait("the API server", airflow.api.healthy, startup_timeout)
    airflow.api.token = airflow.api.ok("POST", "/auth/token", {"username": "tester",
                                                               "password": airflow.password})["access_token"]


def migrate(airflow: Airflow, host: Host) -> None:
    done = host.run([sys.executable, "-m", "airflow", "db", "migrate"], env=airflow_env(airflow, host), timeout=400)
    if done.returncode != 0:
        raise TopologyError(f"airflow db migrate failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


def stop_hosts(hosts: list[Host], components: list[Component]) -> list[Any]:
    """Stop ``components`` gracefully, then kill each host's init (and so whatever is left in it)."""
    survivors = stop_all(components)
    inits = [h.init for h in hosts if h.init is not None]
    for host in hosts:
        if host.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(host.init_pid, signal.SIGKILL)
    return survivors + stop_all(inits, sig_first=signal.SIGKILL)
