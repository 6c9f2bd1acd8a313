"""``checkpoint=True`` through real Airflow runs on real Ray, with real faults.

The checkpoints go to a real S3 server on loopback (SeaweedFS, tests/s3server.py). Every
producer appends to a marker file each time its body runs, so "not recomputed" is
counted, not assumed.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from airflow_ray_provider.xcom.reference import parse_reference
from tests.conftest import BUCKET, s3_client
from tests.dag_runs import result_of, run_py, session_ray_conn, start_py
from tests.test_xcom_backend import stored

pytestmark = pytest.mark.usefixtures("ray_cluster", "s3_endpoint")


def ray_conn(prefix: str, **extra: object) -> dict[str, str]:
    """The session's Ray connection, with its checkpoint root on the S3 endpoint."""
    return session_ray_conn(**{"checkpoint_path": f"s3://{BUCKET}/{prefix}", "checkpoint_conn_id": "ckpt_s3",
                               **extra})


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_cluster_restart_between_upstream_and_downstream(tmp_path: Path, airflow_home: Path) -> None:
    """The whole Ray cluster restarts after the checkpointed upstream; both consumers get equal data."""
    from airflow_ray_provider.local_cluster import LocalRayCluster

    marker = tmp_path / "produce.log"
    env = ray_conn("restart", address="local", namespace="ckpt-restart")
    try:
        result, output = run_py(f"""
            dr = checkpoint_dags.ckpt_restart_dag.test(run_conf={{"rows": 2000, "marker": {str(marker)!r}}})
            emit(states=task_states(dr), run_id=dr.run_id, plain=pulled(dr, "plain_total"),
                 ray=pulled(dr, "ray_total"), restart=pulled(dr, "restart_ray"))
        """, env=env)
    finally:
        LocalRayCluster(airflow_home / "ray").stop()
    assert set(result["states"].values()) == {"success"}, output[-6000:]
    assert lines(marker) == ["produce"]  # the upstream body ran once, before the restart
    before, after = result["restart"].split(" -> ")
    assert before != after  # a new head on a new port: nothing of the old object store survived
    run_id = result["run_id"]
    expected_y = sum(i * 0.5 for i in range(2000))
    assert result["plain"] == pytest.approx(expected_y)
    ray_total = result["ray"]
    assert ray_total["y"] == pytest.approx(expected_y) and ray_total["tags"] == ["a", "b"]
    assert ray_total["w"] == pytest.approx(1000.0)
    # The plain consumer read the checkpoint directly; the Ray consumer put it back into the object store.
    assert "reading it from its checkpoint" in output, output[-6000:]
    assert "restoring it from its checkpoint" in output, output[-6000:]
    ref = parse_reference(stored("ckpt_restart", run_id, "produce", key="frame"))
    assert ref.checkpoint is not None and ref.checkpoint["uri"].startswith(f"s3://{BUCKET}/restart/ckpt_restart/")
    assert ref.checkpoint["part"] == 0 and len(ref.checkpoint["sha256"]) == 64


def value(run_id: str, task_id: str, dag_id: str = "ckpt_restart") -> object:
    from tests.test_xcom_backend import value_of

    return value_of(stored(dag_id, run_id, task_id))


def test_rerun_restores_instead_of_recomputing_unless_inputs_change_or_forced(tmp_path: Path) -> None:
    marker = tmp_path / "produce.log"
    env = ray_conn("reuse")
    code = """
        dr = checkpoint_dags.ckpt_reuse_dag.test(run_after=checkpoint_dags.START, logical_date=checkpoint_dags.START,
                                                run_conf={conf})
        emit(states=task_states(dr), run_id=dr.run_id)
    """

    def run(conf: dict) -> tuple[dict, str]:
        result, output = run_py(code.format(conf=repr({"marker": str(marker), **conf})), env=env)
        assert set(result["states"].values()) == {"success"}, output[-6000:]
        return {"total": value(result["run_id"], "total", "ckpt_reuse")}, output

    first, _ = run({"n": 5})
    assert first["total"] == 30 and lines(marker) == ["produce 5"]
    again, output = run({"n": 5})  # a new process: the task runs again in the same DAG run
    assert again["total"] == 30 and lines(marker) == ["produce 5"], output[-8000:]
    assert "Restored this task's result from its checkpoint" in output
    changed, _ = run({"n": 6})
    assert changed["total"] == 55 and lines(marker) == ["produce 5", "produce 6"]
    forced, output = run({"n": 6, "ray_checkpoint_recompute": ["produce"]})
    assert forced["total"] == 55 and lines(marker) == ["produce 5", "produce 6", "produce 6"]
    assert "Restored this task's result" not in output


def test_mapped_tasks_and_split_items_are_checkpointed_one_by_one(tmp_path: Path, s3_endpoint: str) -> None:
    marker = tmp_path / "bodies.log"
    code = f"""
        dr = checkpoint_dags.ckpt_mapped_dag.test(run_after=checkpoint_dags.START, logical_date=checkpoint_dags.START,
                                                 run_conf={{"marker": {str(marker)!r}}})
        emit(states=task_states(dr), run_id=dr.run_id, total=pulled(dr, "total"))
    """
    first, _ = run_py(code, env=ray_conn("mapped"))
    assert first["total"] == 50 and set(first["states"].values()) == {"success"}
    assert sorted(lines(marker)) == ["numbers", "square 3", "square 4", "square 5"]
    keys = [o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="mapped/")["Contents"]]
    # mapped/<dag>/<run>/<task>/<map index>/result/manifest.json
    folders = {"/".join(k.split("/")[3:5]) for k in keys if k.endswith("/result/manifest.json")}
    assert folders == {"numbers/-1", "square/0", "square/1", "square/2"}, keys
    ref = parse_reference(stored("ckpt_mapped", first["run_id"], "numbers"))
    assert [item.checkpoint["part"] for item in ref] == [0, 1, 2]  # each item is its own file
    again, output = run_py(code, env=ray_conn("mapped"))
    assert again["total"] == 50 and len(lines(marker)) == 4  # nothing ran again
    assert output.count("Restored this task's result from its checkpoint") == 4


def test_a_retry_resumes_from_progress_saved_mid_task(tmp_path: Path) -> None:
    marker = tmp_path / "epochs.log"
    result, output = run_py(f"""
        dr = checkpoint_dags.ckpt_progress_dag.test(run_conf={{"epochs": 5, "fail_at": 2, "marker": {str(marker)!r}}})
        emit(states=task_states(dr), run_id=dr.run_id)
    """, env=ray_conn("progress"))
    assert set(result["states"].values()) == {"success"}, output[-6000:]
    assert "simulated failure after epoch 2" in output
    assert value(result["run_id"], "train", "ckpt_progress") == {"done": [0, 1, 2, 3, 4], "tries": 2}
    # Epochs 0-2 ran in try 1; try 2 started at epoch 3: nothing was done twice.
    assert lines(marker) == ["epoch 0 try 1", "epoch 1 try 1", "epoch 2 try 1", "epoch 3 try 2", "epoch 4 try 2"]


def test_killing_the_worker_mid_write_leaves_no_readable_partial_checkpoint(tmp_path: Path,
                                                                            s3_endpoint: str) -> None:
    marker, pids = tmp_path / "produce.log", tmp_path / "pids.log"
    s3 = s3_client(s3_endpoint)
    proc = start_py(f"""
        dr = checkpoint_dags.ckpt_killed_writer_dag.test(
            run_conf={{"mb": 256, "marker": {str(marker)!r}, "pids": {str(pids)!r}}})
        emit(states=task_states(dr), run_id=dr.run_id)
    """, env=ray_conn("killed"))
    killed_during = None
    started = time.time()
    deadline = time.monotonic() + 600
    while killed_during is None and proc.poll() is None and time.monotonic() < deadline:
        uploads = s3.list_multipart_uploads(Bucket=BUCKET, Prefix="killed/").get("Uploads", [])
        if uploads and lines(pids):
            manifests = s3.list_objects_v2(Bucket=BUCKET, Prefix="killed/").get("Contents", [])
            os.kill(int(lines(pids)[0]), signal.SIGKILL)
            killed_during = (uploads[0]["Key"], [m["Key"] for m in manifests])
        time.sleep(0.05)
    result, output = result_of(proc)
    # The killed worker could not remove its local spool folder (noted in the README's limits); this test's own.
    for spool in Path(tempfile.gettempdir()).glob("airflow-ray-ckpt-*"):
        if spool.stat().st_mtime >= started:
            shutil.rmtree(spool, ignore_errors=True)
    assert killed_during is not None, "the upload was never seen in progress"
    data_key, committed = killed_during
    assert data_key.endswith(".npy") and not any(k.endswith("manifest.json") for k in committed)
    assert set(result["states"].values()) == {"success"}, output[-6000:]
    assert lines(marker) == ["produce", "produce"]  # try 1 was killed mid-write; try 2 recomputed
    assert "Restored this task's result" not in output  # nothing partial was ever taken for a result
    count = 256 * 1024 * 1024 // 8
    assert value(result["run_id"], "check", "ckpt_killed_writer") == {"len": count, "sum": 7.0 * count}


def test_an_unreachable_store_fails_the_task_instead_of_succeeding(tmp_path: Path) -> None:
    marker = tmp_path / "produce.log"
    result, output = run_py(f"""
        dr = checkpoint_dags.ckpt_store_down_dag.test(run_conf={{"marker": {str(marker)!r}}})
        emit(states=task_states(dr))
    """, env=ray_conn("unused"))
    assert result["states"] == {"produce": "failed", "produce_again": "failed"}
    assert lines(marker) == ["produce_again"]  # produce failed before computing anything
    assert f"Cannot read the checkpoint at s3://{BUCKET}/down/ckpt_store_down/" in output
    assert f"Writing the checkpoint to s3://{BUCKET}/down/ckpt_store_down/" in output
    assert "Returned value was" not in output


def test_load_result_reads_past_results_from_ray_or_the_checkpoint(tmp_path: Path) -> None:
    """The notebook helper: latest successful run by default, Ray first, then the checkpoint."""
    result, output = run_py(f"""
        import ray
        from airflow_ray_provider.hooks.ray import RayHook
        from airflow_ray_provider.cluster.owner import get_owner
        from airflow_ray_provider.xcom.reference import parse_reference
        from airflow_ray_provider.xcom.results import load_result
        from airflow_ray_provider.exceptions import ResultNotFound
        dr = checkpoint_dags.ckpt_reuse_dag.test(run_conf={{"n": 4, "marker": {str(tmp_path / "m.log")!r}}})
        latest = load_result("ckpt_reuse", "produce")
        total = load_result("ckpt_reuse", "total", run_id=dr.run_id)
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import select
        with create_session() as s:
            raw = s.execute(select(XComModel.value).where(XComModel.dag_id == "ckpt_reuse",
                XComModel.run_id == dr.run_id, XComModel.task_id == "produce",
                XComModel.key == "return_value")).scalar_one()  # not the extra links' rows
        obj = parse_reference(raw)
        RayHook().get_conn()
        ray.get(get_owner(obj.location.namespace, obj.location.owner).release.remote([obj.key]))  # Ray lost it
        restored = load_result("ckpt_reuse", "produce", run_id=dr.run_id)
        errors = []
        for args in (("ckpt_reuse", "nope"), ("no_such_dag", "produce")):
            try:
                load_result(*args)
            except ResultNotFound as exc:
                errors.append(str(exc))
        emit(latest=latest, total=total, restored=restored, errors=errors)
    """, env=ray_conn("results"))
    assert result["latest"] == [0, 1, 4, 9] and result["total"] == 14
    assert result["restored"] == [0, 1, 4, 9]
    assert "is not available from Ray (RayXComObjectLost); reading it from its checkpoint" in output
    assert "task 'nope'" in result["errors"][0] and "no checkpoint" in result["errors"][0]
    assert "'no_such_dag' has no successful run" in result["errors"][1]


def test_a_failed_restore_does_not_poison_the_key(tmp_path: Path) -> None:
    """The object is gone and its checkpoint is unreadable for a while: the next consumer restores it."""
    import logging

    import ray

    from airflow_ray_provider.xcom.backend import object_refs, release

    root = tmp_path / "ckpt"
    result, output = run_py(f"""
        dr = checkpoint_dags.ckpt_reuse_dag.test(run_after=checkpoint_dags.START, logical_date=checkpoint_dags.START,
                                                run_conf={{"marker": {str(tmp_path / 'marker')!r}, "n": 4}})
        emit(states=task_states(dr), run_id=dr.run_id)
    """, env=session_ray_conn(checkpoint_path=str(root)))
    assert set(result["states"].values()) == {"success"}, output[-6000:]
    ref = parse_reference(stored("ckpt_reuse", result["run_id"], "produce"))
    assert release([ref]) == 1  # Ray no longer has it; only the checkpoint does
    root.rename(tmp_path / "away")  # the store is unreachable: the first restore fails
    with pytest.raises(Exception, match="checkpoint") as first:
        object_refs([ref], restore_log=logging.getLogger("test"))
    (tmp_path / "away").rename(root)
    (restored,) = object_refs([ref], restore_log=logging.getLogger("test"))
    assert ray.get(restored, timeout=60) == [0, 1, 4, 9], first.value
