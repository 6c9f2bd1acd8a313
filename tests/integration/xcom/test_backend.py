"""``RayXComBackend`` through real Airflow runs (``dag.test()`` in this process) on the session's Ray head."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from airflow_ray_provider.cluster import ray_compat
from airflow_ray_provider.cluster.owner import get_owner
from airflow_ray_provider.exceptions import RayXComObjectLost
from airflow_ray_provider.hooks.ray import RayHook
from airflow_ray_provider.xcom.reference import RayObject, RayObjectDict, RayObjectList, parse_reference
from airflow_ray_provider.xcom.retention import collect_garbage
from tests.dags import xcom_dags
from tests.support.rows import pulled, stored, task_states, ti_states, value_of

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _log(capfd: pytest.CaptureFixture[str]) -> str:
    out = capfd.readouterr()
    return out.out + out.err


def held_keys(prefix: str) -> list[str]:
    """The owner actor's keys under ``prefix`` (what it holds in Ray for those tasks)."""
    import ray

    hook = RayHook()
    hook.get_conn()
    return [k for k in ray.get(get_owner(hook.settings.namespace, 0).keys.remote(), timeout=60)
            if k.startswith(prefix)]


def store_used_mib() -> float:
    import ray

    RayHook().get_conn()
    use = ray_compat.object_store_use(ray.get_runtime_context().gcs_address)
    assert use is not None, "ray memory --stats-only gave no Plasma line"
    return use[0] / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory since the last ``reset_peak_rss`` (VmHWM, in MiB)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def reset_peak_rss() -> None:
    """Linux's reset of the peak RSS (``clear_refs`` value 5, since Linux 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


@pytest.mark.smoke
def test_ray_results_stay_in_ray_and_reach_ray_tasks_by_reference() -> None:
    dr = xcom_dags.xcom_handoff_dag.test(run_conf={"mb": 4})
    assert set(task_states(dr).values()) == {"success"}, ti_states(dr)
    raw = stored("xcom_handoff", dr.run_id, "produce")
    # The DB row is a small reference: what, how big, where; never the data.
    assert raw["__airflow_ray__"] == "object" and len(json.dumps(raw)) < 2000
    assert raw["type"] == "numpy.ndarray" and raw["size"] >= 4 * 1024 * 1024
    assert raw["summary"] == "ndarray shape=(524288,) dtype=float64"
    assert raw["nodes"] and raw["origin"]["task_id"] == "produce"
    # What the UI's XCom tab and the REST API render: the summary, computed without touching Ray.
    from airflow.serialization.stringify import stringify

    assert stringify(raw)["summary"] == raw["summary"]
    consumed = pulled(dr, "consume")
    # The Ray consumer mapped the array straight from the shared-memory store (read-only, zero-copy).
    assert consumed["n"] == 524288 and consumed["writeable"] is False
    n = 524288
    assert consumed["sum"] == n * (n - 1) / 2
    # The plain task got the real array and agreed on the sum.
    assert pulled(dr, "plain") == {"n": n, "sum": n * (n - 1) / 2}
    # Anyone outside a Ray task (ti.xcom_pull, a notebook) gets the value on demand.
    arr = value_of(raw)
    assert type(arr).__name__ == "ndarray" and arr.shape == (n,)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs "
                    "to reset the peak RSS between the two runs")
def test_airflow_process_memory_does_not_grow_with_the_object() -> None:
    """Peak RSS of the process running the tasks (this one), for a 16 MiB and a 768 MiB hand-off."""
    peaks = {}
    for mb in (16, 768):
        reset_peak_rss()
        dr = xcom_dags.xcom_ray_only_dag.test(run_conf={"mb": mb})
        peaks[mb] = peak_rss_mib()
        assert set(task_states(dr).values()) == {"success"}, ti_states(dr)
        raw = stored("xcom_ray_only", dr.run_id, "produce")
        assert raw["size"] >= mb * 1024 * 1024  # the object really was that big, in Ray
        assert pulled(dr, "consume") == mb * 1024 * 1024 / 8
    growth = peaks[768] - peaks[16]
    assert growth < 100, f"Airflow process peak RSS grew by {growth:.0f} MiB for a 752 MiB larger object: {peaks}"


def test_multiple_outputs_and_mapping_address_each_item() -> None:
    dr = xcom_dags.xcom_shapes_dag.test()
    assert set(ti_states(dr).values()) == {"success"}, ti_states(dr)
    run_id = dr.run_id
    listed = parse_reference(stored("xcom_shapes", run_id, "items"))
    # A list consumed by .expand() is split: one Ray object per item, each addressable alone.
    assert isinstance(listed, RayObjectList) and len(listed) == 3
    assert len({obj.key for obj in listed}) == 3 and all(obj.type == "int" for obj in listed)
    assert [pulled(dr, "double", map_index=i) for i in range(3)] == [20, 40, 60]
    # multiple_outputs: one XCom per key, each its own object; return_value lists them.
    frame = parse_reference(stored("xcom_shapes", run_id, "split", key="frame"))
    assert isinstance(frame, RayObject) and frame.type.split(".")[-1] == "DataFrame"
    assert frame.summary == "DataFrame 5 rows x 2 columns [a, b]"
    whole = parse_reference(stored("xcom_shapes", run_id, "split"))
    assert isinstance(whole, RayObjectDict) and whole["frame"].key == frame.key
    assert pulled(dr, "split", key="count") == 5
    assert pulled(dr, "total") == {"doubled": [20, 40, 60], "plussed": [11, 21, 31], "rows": 5, "count": 5}
    assert pulled(dr, "check") == "DataFrame:5:['count', 'frame']"


def test_plain_task_values_above_the_threshold_go_to_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__RAY__XCOM_THRESHOLD", "200")
    dr = xcom_dags.xcom_plain_large_dag.test(run_conf={"n": 1000})
    assert set(task_states(dr).values()) == {"success"}, ti_states(dr)
    big = stored("xcom_plain_large", dr.run_id, "big")
    assert big["__airflow_ray__"] == "object" and big["summary"] == "list of 1000 items of int"
    assert stored("xcom_plain_large", dr.run_id, "small") == 42  # small values stay in the DB, as with BaseXCom
    assert pulled(dr, "ray_len") == 1042
    assert stored("xcom_plain_large", dr.run_id, "plain_len") == 1000


def test_lost_object_fails_consumers_with_names_and_checkpoint_hint(capfd: pytest.CaptureFixture[str]) -> None:
    dr = xcom_dags.xcom_lost_dag.test()
    output = _log(capfd)
    assert task_states(dr) == {"produce": "success", "forget": "success", "ray_consumer": "failed",
                               "plain_consumer": "failed"}
    expected = f"dag 'xcom_lost', task 'produce', run '{dr.run_id}', map index -1"
    assert output.count(expected) >= 2, output[-6000:]  # both consumers named the lost upstream
    assert "RayXComObjectLost" in output and "checkpoint=True" in output
    assert "None" not in re.findall(r"Returned value was: (\S+)", output)


def test_a_retry_purges_the_xcoms_of_the_try_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Airflow clears a task's XComs before it runs again (retry or clear); the backend frees their objects."""
    monkeypatch.setenv("AIRFLOW__RAY__XCOM_THRESHOLD", "1000")
    dr = xcom_dags.xcom_retry_purge_dag.test()
    assert set(task_states(dr).values()) == {"success"}, ti_states(dr)
    assert pulled(dr, "flaky") == 2  # it took two tries
    partial = stored("xcom_retry_purge", dr.run_id, "flaky", key="partial")
    assert partial["__airflow_ray__"] == "object"  # large: held in Ray, not the DB
    assert held_keys(f"xcom_retry_purge/{dr.run_id}/") == [partial["key"]]  # the first try's object was released


RUNS = 10


def test_gc_frees_the_objects_of_deleted_runs() -> None:
    """Ten DAG runs, then delete them: the object store's used memory returns to where it started."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    start_mib, start_keys = store_used_mib(), len(held_keys("xcom_lifecycle/"))
    runs = [xcom_dags.xcom_lifecycle_dag.test(run_conf={"mb": 2}) for _ in range(RUNS)]
    loaded_mib, loaded_keys = store_used_mib(), len(held_keys("xcom_lifecycle/"))
    assert {s for dr in runs for s in ti_states(dr).values()} == {"success"}
    assert loaded_keys == start_keys + RUNS * 2
    assert loaded_mib >= start_mib + RUNS * 2, (start_mib, loaded_mib)
    with create_session() as session:  # what deleting runs in the UI / REST API does to the rows
        session.execute(delete(DagRun).where(DagRun.dag_id == "xcom_lifecycle"))
    collect_garbage(grace_s=0)
    deadline = time.monotonic() + 60
    while (end_mib := store_used_mib()) > start_mib + 1 and time.monotonic() < deadline:
        time.sleep(0.5)  # Ray frees released objects asynchronously
    assert len(held_keys("xcom_lifecycle/")) == start_keys
    assert end_mib <= start_mib + 1, (start_mib, loaded_mib, end_mib)  # the store's used memory is back


def test_retention_releases_objects_of_finished_runs() -> None:
    dr = xcom_dags.xcom_lifecycle_dag.test(run_conf={"mb": 1})
    kept = collect_garbage(retention_s=3600, grace_s=0)
    expired = collect_garbage(retention_s=0, grace_s=0)
    assert not [k for k in kept.released if dr.run_id in k]  # within retention: kept
    assert len([k for k in expired.released if dr.run_id in k]) == 2
    with pytest.raises(RayXComObjectLost, match=r"task 'blob'.*checkpoint=True"):
        pulled(dr, "blob")


def test_a_finished_run_starts_the_gc_in_the_background(airflow_home: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The provider's listener runs ``airflow-ray upkeep`` when a DAG run ends (here: retentions 0).

    That is ``xcom gc`` and ``checkpoints prune``.
    """
    from airflow_ray_provider.cluster.checkpoint import TaskCheckpoint, TaskKey
    from airflow_ray_provider.storage import make_store

    old = TaskCheckpoint(make_store(str(tmp_path / "ckpt"), None), TaskKey("old_dag", "old_run", "t"))
    old.write_result("old")
    for name, value in (("XCOM_GC_INTERVAL", "0"), ("XCOM_RETENTION", "0"), ("CHECKPOINT_RETENTION", "0"),
                        ("CHECKPOINT_PATH", str(tmp_path / "ckpt"))):
        monkeypatch.setenv(f"AIRFLOW__RAY__{name}", value)
    log_path = airflow_home / "airflow-ray-upkeep.log"
    log_path.unlink(missing_ok=True)
    with caplog.at_level(logging.INFO, logger="airflow_ray_provider.plugins"):
        dr = xcom_dags.xcom_lifecycle_dag.test(run_conf={"mb": 1})
    assert "Started airflow-ray upkeep" in caplog.text, caplog.text[-4000:]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log_path.exists() and "pruned" in log_path.read_text()):
        time.sleep(1)  # wait for the background gc, so it cannot touch later tests' objects
    log = log_path.read_text() if log_path.exists() else ""
    assert re.search(r"past retention; released \d+", log), log
    assert held_keys(f"xcom_lifecycle/{dr.run_id}/") == []
    assert "pruned 1 task checkpoint folder(s)" in log, log
    assert not (tmp_path / "ckpt" / "old_dag").exists()
