"""``checkpoint=True`` through real Airflow runs (``dag.test()`` in this process) on real Ray, with real faults.

The checkpoints go to the session's S3 server (SeaweedFS on loopback). Every producer appends to a
marker file each time its body runs, so "not recomputed" is counted, not assumed. A whole-cluster restart
between upstream and downstream is in tests/system/hooks/test_cluster_restart.py (it needs a head of its own).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_ray_provider.exceptions import ResultNotFound
from airflow_ray_provider.xcom.backend import object_refs, release
from airflow_ray_provider.xcom.reference import parse_reference
from airflow_ray_provider.xcom.results import load_result
from tests.dags import checkpoint_dags
from tests.support.rows import pulled, stored, task_states
from tests.support.s3server import BUCKET, s3_client

pytestmark = pytest.mark.usefixtures("ray_cluster", "s3_endpoint")
Use = Callable[..., Any]


def on_s3(ray_connection: Use, prefix: str) -> None:
    """The session's Ray connection, with its checkpoint root on the S3 endpoint."""
    ray_connection(checkpoint_path=f"s3://{BUCKET}/{prefix}", checkpoint_conn_id="ckpt_s3")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _log(capfd: pytest.CaptureFixture[str]) -> str:
    out = capfd.readouterr()
    return out.out + out.err


def test_rerun_restores_instead_of_recomputing_unless_inputs_change_or_forced(
        tmp_path: Path, ray_connection: Use, capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "produce.log"
    on_s3(ray_connection, "reuse")

    def run(conf: dict[str, Any]) -> tuple[Any, str]:
        capfd.readouterr()
        dr = checkpoint_dags.ckpt_reuse_dag.test(run_after=checkpoint_dags.START, logical_date=checkpoint_dags.START,
                                                run_conf={"marker": str(marker), **conf})
        output = _log(capfd)
        assert set(task_states(dr).values()) == {"success"}, output[-6000:]
        return pulled(dr, "total"), output

    total, _ = run({"n": 5})
    assert total == 30 and lines(marker) == ["produce 5"]
    total, output = run({"n": 5})  # the task runs again in the same DAG run
    assert total == 30 and lines(marker) == ["produce 5"], output[-8000:]
    assert "Restored this task's result from its checkpoint" in output
    total, _ = run({"n": 6})
    assert total == 55 and lines(marker) == ["produce 5", "produce 6"]
    total, output = run({"n": 6, "ray_checkpoint_recompute": ["produce"]})
    assert total == 55 and lines(marker) == ["produce 5", "produce 6", "produce 6"]
    assert "Restored this task's result" not in output


def test_mapped_tasks_and_split_items_are_checkpointed_one_by_one(
        tmp_path: Path, s3_endpoint: str, ray_connection: Use, capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "bodies.log"
    on_s3(ray_connection, "mapped")

    def run() -> Any:
        dr = checkpoint_dags.ckpt_mapped_dag.test(run_after=checkpoint_dags.START, logical_date=checkpoint_dags.START,
                                                 run_conf={"marker": str(marker)})
        assert set(task_states(dr).values()) == {"success"}, task_states(dr)
        assert pulled(dr, "total") == 50
        return dr

    first = run()
    assert sorted(lines(marker)) == ["numbers", "square 3", "square 4", "square 5"]
    keys = [o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="mapped/")["Contents"]]
    # mapped/<dag>/<run>/<task>/<map index>/result/manifest.json
    folders = {"/".join(k.split("/")[3:5]) for k in keys if k.endswith("/result/manifest.json")}
    assert folders == {"numbers/-1", "square/0", "square/1", "square/2"}, keys
    ref = parse_reference(stored("ckpt_mapped", first.run_id, "numbers"))
    assert [item.checkpoint["part"] for item in ref] == [0, 1, 2]  # each item is its own file
    capfd.readouterr()
    run()
    assert len(lines(marker)) == 4  # nothing ran again
    assert _log(capfd).count("Restored this task's result from its checkpoint") == 4


@pytest.mark.smoke
def test_a_retry_resumes_from_progress_saved_mid_task(tmp_path: Path, ray_connection: Use,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "epochs.log"
    on_s3(ray_connection, "progress")
    dr = checkpoint_dags.ckpt_progress_dag.test(run_conf={"epochs": 5, "fail_at": 2, "marker": str(marker)})
    output = _log(capfd)
    assert set(task_states(dr).values()) == {"success"}, output[-6000:]
    assert "simulated failure after epoch 2" in output
    assert pulled(dr, "train") == {"done": [0, 1, 2, 3, 4], "tries": 2}
    # Epochs 0-2 ran in try 1; try 2 started at epoch 3: nothing was done twice.
    assert lines(marker) == ["epoch 0 try 1", "epoch 1 try 1", "epoch 2 try 1", "epoch 3 try 2", "epoch 4 try 2"]


@pytest.mark.timeout(600)
def test_killing_the_worker_mid_write_leaves_no_readable_partial_checkpoint(
        tmp_path: Path, s3_endpoint: str, ray_connection: Use, capfd: pytest.CaptureFixture[str]) -> None:
    marker, pids = tmp_path / "produce.log", tmp_path / "pids.log"
    on_s3(ray_connection, "killed")
    s3 = s3_client(s3_endpoint)
    killed_during: list[tuple[str, list[str]]] = []
    stop = threading.Event()

    def kill_mid_upload() -> None:
        """Watches the bucket from a thread while this process runs the DAG; kills the worker mid-upload."""
        while not stop.is_set():
            uploads = s3.list_multipart_uploads(Bucket=BUCKET, Prefix="killed/").get("Uploads", [])
            if uploads and lines(pids):
                manifests = s3.list_objects_v2(Bucket=BUCKET, Prefix="killed/").get("Contents", [])
                os.kill(int(lines(pids)[0]), signal.SIGKILL)
                killed_during.append((uploads[0]["Key"], [m["Key"] for m in manifests]))
                return
            stop.wait(0.05)

    started = time.time()
    killer = threading.Thread(target=kill_mid_upload, name="kill-mid-upload", daemon=True)
    killer.start()
    try:
        dr = checkpoint_dags.ckpt_killed_writer_dag.test(
            run_conf={"mb": 256, "marker": str(marker), "pids": str(pids)})
    finally:
        stop.set()
        killer.join(30)
    output = _log(capfd)
    # The killed worker could not remove its local spool folder (noted in the README's limits); this test's own.
    for spool in Path(tempfile.gettempdir()).glob("airflow-ray-ckpt-*"):
        if spool.stat().st_mtime >= started:
            shutil.rmtree(spool, ignore_errors=True)
    assert killed_during, "the upload was never seen in progress"
    ((data_key, committed),) = killed_during
    assert data_key.endswith(".npy") and not any(k.endswith("manifest.json") for k in committed)
    assert set(task_states(dr).values()) == {"success"}, output[-6000:]
    assert lines(marker) == ["produce", "produce"]  # try 1 was killed mid-write; try 2 recomputed
    assert "Restored this task's result" not in output  # nothing partial was ever taken for a result
    count = 256 * 1024 * 1024 // 8
    assert pulled(dr, "check") == {"len": count, "sum": 7.0 * count}


def test_an_unreachable_store_fails_the_task_instead_of_succeeding(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "produce.log"
    dr = checkpoint_dags.ckpt_store_down_dag.test(run_conf={"marker": str(marker)})
    output = _log(capfd)
    assert task_states(dr) == {"produce": "failed", "produce_again": "failed"}
    assert lines(marker) == ["produce_again"]  # produce failed before computing anything
    assert f"Cannot read the checkpoint at s3://{BUCKET}/down/ckpt_store_down/" in output
    assert f"Writing the checkpoint to s3://{BUCKET}/down/ckpt_store_down/" in output
    assert "Returned value was" not in output


def test_load_result_reads_past_results_from_ray_or_the_checkpoint(tmp_path: Path, ray_connection: Use,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The notebook helper: latest successful run by default, Ray first, then the checkpoint."""
    on_s3(ray_connection, "results")
    dr = checkpoint_dags.ckpt_reuse_dag.test(run_conf={"n": 4, "marker": str(tmp_path / "m.log")})
    assert load_result("ckpt_reuse", "produce") == [0, 1, 4, 9]
    assert load_result("ckpt_reuse", "total", run_id=dr.run_id) == 14
    obj = parse_reference(stored("ckpt_reuse", dr.run_id, "produce"))  # not the extra links' rows
    assert release([obj]) == 1  # Ray lost it
    with caplog.at_level(logging.INFO):
        assert load_result("ckpt_reuse", "produce", run_id=dr.run_id) == [0, 1, 4, 9]
    assert "is not available from Ray (RayXComObjectLost); reading it from its checkpoint" in caplog.text
    for args, wanted in ((("ckpt_reuse", "nope"), ("task 'nope'", "no checkpoint")),
                         (("no_such_dag", "produce"), ("'no_such_dag' has no successful run",))):
        with pytest.raises(ResultNotFound) as info:
            load_result(*args)
        assert all(text in str(info.value) for text in wanted), str(info.value)


def test_a_failed_restore_does_not_poison_the_key(tmp_path: Path, ray_connection: Use) -> None:
    """The object is gone and its checkpoint is unreadable for a while: the next consumer restores it."""
    import ray

    root = tmp_path / "ckpt"
    ray_connection(checkpoint_path=str(root))
    dr = checkpoint_dags.ckpt_reuse_dag.test(run_after=checkpoint_dags.START, logical_date=checkpoint_dags.START,
                                            run_conf={"marker": str(tmp_path / "marker"), "n": 4})
    assert set(task_states(dr).values()) == {"success"}, task_states(dr)
    ref = parse_reference(stored("ckpt_reuse", dr.run_id, "produce"))
    assert release([ref]) == 1  # Ray no longer has it; only the checkpoint does
    root.rename(tmp_path / "away")  # the store is unreachable: the first restore fails
    with pytest.raises(Exception, match="checkpoint") as first:
        object_refs([ref], restore_log=logging.getLogger("test"))
    (tmp_path / "away").rename(root)
    (restored,) = object_refs([ref], restore_log=logging.getLogger("test"))
    assert ray.get(restored, timeout=60) == [0, 1, 4, 9], first.value
