"""What a task process pays to run one call: as a Ray driver (today's @task.ray) against through the gateway.

    python benchmarks/gateway_submit.py [--pairs 5] [--calls 20]

Starts an embedded Ray head and the gateway on it, then, alternating, fresh processes that each run one small
call (submit, follow to the end, fetch the value, release) either as a Ray driver (``ray.init`` and the
provider's ``RayTaskRun``, as an Airflow task process does now) or through ``GatewayClient`` with Ray blocked
from import. Wall time and CPU seconds (user + system, of the process and its children) per process; then, in
one warm process each, ``--calls`` calls one after another. Neither side imports Airflow: this is the transport
alone. Writes ``benchmarks/results/gateway_submit.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.benchutil import ROOT, cpu_model, provider_commit, publish

NAMESPACE = "bench"

CALL = textwrap.dedent("""
    def rows(n):
        return [{"i": i} for i in range(n)]
""")

DRIVER = textwrap.dedent("""
    import json, logging, os, resource, sys, time, uuid
    t0 = time.monotonic()
    import ray
    from airflow_ray_provider.submission import RayTaskRun
    ray.init(address=sys.argv[1], namespace=sys.argv[2], log_to_driver=False)
    {call}
    calls, times = int(sys.argv[3]), []
    for _ in range(calls):
        t = time.monotonic()
        run = RayTaskRun(key=f"bench/{{uuid.uuid4().hex}}", task_label="bench.rows", namespace=sys.argv[2],
                         shards=1, lease_s=60, log=logging.getLogger("bench"))
        run.submit(rows, (100,), {{}}, {{"num_cpus": 0}})
        assert run.wait()["state"] == "finished"
        assert len(run.fetch()) == 100
        run.release()
        times.append(time.monotonic() - t)
    ray.shutdown()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({{"wall": time.monotonic() - t0, "cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                      "calls": times}}))
""")

GATEWAY = textwrap.dedent("""
    import json, resource, sys, time, uuid
    t0 = time.monotonic()
    sys.modules["ray"] = None  # not a Ray node, not a driver: Ray cannot even be imported
    import cloudpickle
    from airflow_ray_provider.gateway_client import GatewayClient
    {call}
    calls, times = int(sys.argv[5]), []
    ns = sys.argv[3]
    with GatewayClient(sys.argv[1], bytes.fromhex(sys.argv[2])) as client:
        for _ in range(calls):
            t = time.monotonic()
            key = f"bench/{{uuid.uuid4().hex}}"
            client.submit(key, ns, 0, (cloudpickle.dumps(rows), (100,), {{}}), {{"num_cpus": 0}}, lease_s=60)
            offset = 0
            while (status := client.poll(key, ns, 0, offset, wait=5))["state"] == "running":
                offset = status["log_offset"]
            assert status["state"] == "finished", status
            assert len(client.value(key, ns, 0)) == 100
            client.release([key], ns, 0)
            times.append(time.monotonic() - t)
    me = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({{"wall": time.monotonic() - t0, "cpu": me.ru_utime + me.ru_stime, "calls": times}}))
""")


def _run(script: str, args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "RAY_USAGE_STATS_ENABLED": "0"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    import ray

    from airflow_ray_provider.cluster import ray_compat
    from airflow_ray_provider.cluster.gateway import GatewayConfig, ensure_gateway
    from airflow_ray_provider.cluster.gateway_auth import derive_key
    from airflow_ray_provider.local_cluster import LocalRayCluster, keep_loopback_addresses

    keep_loopback_addresses()  # the embedded head listens on loopback only; the drivers inherit the switch
    work = Path(tempfile.mkdtemp(prefix="gateway-submit-"))
    cluster = LocalRayCluster(work / "ray", num_cpus=2)
    state = cluster.ensure_running()
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.auth_token() or "")
    ray_compat.reload_auth_config()  # Ray read its auth settings when it was imported, before the head existed
    driver, gateway = DRIVER.format(call=CALL), GATEWAY.format(call=CALL)
    try:
        ray.init(address=state.address, namespace=NAMESPACE, log_to_driver=False)
        key = derive_key(os.urandom(32))
        host, port, _ = ensure_gateway(GatewayConfig(key))
        url = f"http://{host}:{port}"
        d_args, g_args = [state.address, NAMESPACE], [url, key.hex(), NAMESPACE, "0"]
        _run(driver, [*d_args, "1"])  # warm-up: the keeper and the owner actor, a Ray worker
        _run(gateway, [*g_args, "1"])
        fresh: dict[str, list[dict]] = {"driver": [], "gateway": []}
        for i in range(args.pairs):
            order = ("driver", "gateway") if i % 2 == 0 else ("gateway", "driver")
            for side in order:
                fresh[side].append(_run(driver, [*d_args, "1"]) if side == "driver" else _run(gateway, [*g_args, "1"]))
        warm = {"driver": _run(driver, [*d_args, str(args.calls)]),
                "gateway": _run(gateway, [*g_args, str(args.calls)])}
    finally:
        ray.shutdown()
        cluster.stop()
    report = _report(fresh, warm, args)
    publish(report, ROOT / "benchmarks" / "results" / "gateway_submit.md")
    return 0


def _report(fresh: dict[str, list[dict]], warm: dict[str, dict], args: argparse.Namespace) -> str:
    med = statistics.median
    rows = []
    for what, pick in (("process wall s", lambda r: r["wall"]), ("process CPU s", lambda r: r["cpu"]),
                       ("its one call s", lambda r: r["calls"][0])):
        d, g = med(pick(r) for r in fresh["driver"]), med(pick(r) for r in fresh["gateway"])
        rows.append(f"| fresh process: {what} | {d:.2f} | {g:.2f} | {g / d:.2f} |")
    wd, wg = med(warm["driver"]["calls"]), med(warm["gateway"]["calls"])
    rows.append(f"| warm process: one call s (median of {args.calls}) | {wd:.3f} | {wg:.3f} | {wg / wd:.2f} |")
    return "\n".join([
        "# One call from a task process: as a Ray driver, and through the gateway",
        "",
        f"`python benchmarks/gateway_submit.py --pairs {args.pairs} --calls {args.calls}` on "
        f"{dt.date.today().isoformat()}, provider {provider_commit()}, {cpu_model()}, Python "
        f"{sys.version.split()[0]}. Medians of {args.pairs} fresh processes each, alternating; the call returns "
        "100 small rows. Ray driver: `ray.init` + `RayTaskRun` (submit, wait, fetch, release); gateway: "
        "`GatewayClient` (submit, poll, value, release) with `ray` blocked from import. Neither imports Airflow.",
        "",
        "| | Ray driver | gateway | gateway / driver |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        "Raw: " + json.dumps({"fresh": fresh, "warm": warm}),
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
