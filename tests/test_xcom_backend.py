"""``RayXComBackend`` through real Airflow runs on a real Ray head.

The XCom backend is chosen when Airflow is imported, so each DAG run happens in a
subprocess with ``AIRFLOW__CORE__XCOM_BACKEND`` set; that subprocess shares this
session's SQLite metadata DB and Ray head, and prints what it measured as JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from airflow_ray_provider.exceptions import RayXComReferenceError
from airflow_ray_provider.xcom.backend import RayXComBackend
from airflow_ray_provider.xcom.reference import RayObject, RayObjectDict, RayObjectList, parse_reference
from tests.dag_runs import run_py

pytestmark = pytest.mark.usefixtures("ray_cluster")
def stored(dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    """The raw JSON the metadata DB holds for one XCom (what the UI and REST API read)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.execute(select(XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
            XComModel.key == key, XComModel.map_index == map_index)).scalar_one()


def value_of(raw: Any) -> Any:
    """What a plain task or ``ti.xcom_pull`` gets for a stored XCom (fetched from Ray if it is a reference)."""
    return RayXComBackend.deserialize_value(type("Row", (), {"value": raw})())


def test_ray_results_stay_in_ray_and_reach_ray_tasks_by_reference() -> None:
    result, _ = run_py("""
        dr = xcom_dags.xcom_handoff_dag.test(run_conf={"mb": 4})
        emit(run_id=dr.run_id, states={f"{t}": s for (t, _), s in ti_states(dr).items()})
    """)
    assert set(result["states"].values()) == {"success"}, result
    raw = stored("xcom_handoff", result["run_id"], "produce")
    # The DB row is a small reference: what, how big, where; never the data.
    assert raw["__airflow_ray__"] == "object" and len(json.dumps(raw)) < 2000
    assert raw["type"] == "numpy.ndarray" and raw["size"] >= 4 * 1024 * 1024
    assert raw["summary"] == "ndarray shape=(524288,) dtype=float64"
    assert raw["nodes"] and raw["origin"]["task_id"] == "produce"
    # What the UI's XCom tab and the REST API render: the summary, computed without touching Ray.
    from airflow.serialization.stringify import stringify

    assert stringify(raw)["summary"] == raw["summary"]
    consumed = value_of(stored("xcom_handoff", result["run_id"], "consume"))
    # The Ray consumer mapped the array straight from the shared-memory store (read-only, zero-copy).
    assert consumed["n"] == 524288 and consumed["writeable"] is False
    n = 524288
    assert consumed["sum"] == n * (n - 1) / 2
    # The plain task got the real array and agreed on the sum.
    assert value_of(stored("xcom_handoff", result["run_id"], "plain")) == {"n": n, "sum": n * (n - 1) / 2}
    # Anyone outside a Ray task (ti.xcom_pull, a notebook) gets the value on demand.
    arr = value_of(raw)
    assert type(arr).__name__ == "ndarray" and arr.shape == (n,)


def test_airflow_process_memory_does_not_grow_with_the_object() -> None:
    """Peak RSS of the process running the tasks, for a 16 MiB and a 768 MiB hand-off."""
    peaks = {}
    for mb in (16, 768):
        result, _ = run_py(f"""
            dr = xcom_dags.xcom_ray_only_dag.test(run_conf={{"mb": {mb}}})
            emit(run_id=dr.run_id, states=sorted(set(ti_states(dr).values())),
                 peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """)
        assert result["states"] == ["success"], result
        raw = stored("xcom_ray_only", result["run_id"], "produce")
        assert raw["size"] >= mb * 1024 * 1024  # the object really was that big, in Ray
        assert value_of(stored("xcom_ray_only", result["run_id"], "consume")) == mb * 1024 * 1024 / 8
        peaks[mb] = result["peak_kib"] / 1024
    growth = peaks[768] - peaks[16]
    assert growth < 100, f"Airflow process peak RSS grew by {growth:.0f} MiB for a 752 MiB larger object: {peaks}"


def test_multiple_outputs_and_mapping_address_each_item() -> None:
    result, _ = run_py("""
        dr = xcom_dags.xcom_shapes_dag.test()
        emit(run_id=dr.run_id, states={f"{t}[{m}]": s for (t, m), s in ti_states(dr).items()})
    """)
    assert set(result["states"].values()) == {"success"}, result
    run_id = result["run_id"]
    listed = parse_reference(stored("xcom_shapes", run_id, "items"))
    # A list consumed by .expand() is split: one Ray object per item, each addressable alone.
    assert isinstance(listed, RayObjectList) and len(listed) == 3
    assert len({obj.key for obj in listed}) == 3 and all(obj.type == "int" for obj in listed)
    assert [value_of(stored("xcom_shapes", run_id, "double", map_index=i)) for i in range(3)] == [20, 40, 60]
    # multiple_outputs: one XCom per key, each its own object; return_value lists them.
    frame = parse_reference(stored("xcom_shapes", run_id, "split", key="frame"))
    assert isinstance(frame, RayObject) and frame.type.split(".")[-1] == "DataFrame"
    assert frame.summary == "DataFrame 5 rows x 2 columns [a, b]"
    whole = parse_reference(stored("xcom_shapes", run_id, "split"))
    assert isinstance(whole, RayObjectDict) and whole["frame"].key == frame.key
    assert value_of(stored("xcom_shapes", run_id, "split", key="count")) == 5
    assert value_of(stored("xcom_shapes", run_id, "total")) == {
        "doubled": [20, 40, 60], "plussed": [11, 21, 31], "rows": 5, "count": 5}
    assert value_of(stored("xcom_shapes", run_id, "check")) == "DataFrame:5:['count', 'frame']"


def test_plain_task_values_above_the_threshold_go_to_ray() -> None:
    result, _ = run_py("""
        dr = xcom_dags.xcom_plain_large_dag.test(run_conf={"n": 1000})
        emit(run_id=dr.run_id, states=sorted(set(ti_states(dr).values())))
    """, env={"AIRFLOW__RAY__XCOM_THRESHOLD": "200"})
    assert result["states"] == ["success"], result
    run_id = result["run_id"]
    big = stored("xcom_plain_large", run_id, "big")
    assert big["__airflow_ray__"] == "object" and big["summary"] == "list of 1000 items of int"
    assert stored("xcom_plain_large", run_id, "small") == 42  # small values stay in the DB, as with BaseXCom
    assert value_of(stored("xcom_plain_large", run_id, "ray_len")) == 1042
    assert stored("xcom_plain_large", run_id, "plain_len") == 1000


def test_lost_object_fails_consumers_with_names_and_checkpoint_hint() -> None:
    result, output = run_py("""
        dr = xcom_dags.xcom_lost_dag.test()
        emit(run_id=dr.run_id, states={t: s for (t, _), s in ti_states(dr).items()})
    """)
    assert result["states"] == {"produce": "success", "forget": "success", "ray_consumer": "failed",
                                "plain_consumer": "failed"}, result
    expected = f"dag 'xcom_lost', task 'produce', run '{result['run_id']}', map index -1"
    assert output.count(expected) >= 2, output[-6000:]  # both consumers named the lost upstream
    assert "RayXComObjectLost" in output and "checkpoint=True" in output
    assert "None" not in re.findall(r"Returned value was: (\S+)", output)


def test_a_retry_purges_the_xcoms_of_the_try_before() -> None:
    """Airflow clears a task's XComs before it runs again (retry or clear); the backend frees their objects."""
    result, _ = run_py("""
        import ray
        from airflow_ray_provider.hooks.ray import RayHook
        from airflow_ray_provider.cluster.owner import get_owner
        dr = xcom_dags.xcom_retry_purge_dag.test()
        keys = [k for k in ray.get(get_owner(RayHook().settings.namespace, 0).keys.remote())
                if k.startswith(f"xcom_retry_purge/{dr.run_id}/")]
        emit(run_id=dr.run_id, states=sorted(set(ti_states(dr).values())), keys=keys)
    """, env={"AIRFLOW__RAY__XCOM_THRESHOLD": "1000"})
    assert result["states"] == ["success"], result
    assert value_of(stored("xcom_retry_purge", result["run_id"], "flaky")) == 2  # it took two tries
    partial = stored("xcom_retry_purge", result["run_id"], "flaky", key="partial")
    assert partial["__airflow_ray__"] == "object"  # large: held in Ray, not the DB
    assert result["keys"] == [partial["key"]]  # the first try's object was released


def test_gc_frees_the_objects_of_deleted_runs() -> None:
    """50 DAG runs, then delete them: the object store's used memory returns to where it started."""
    result, _ = run_py("""
        import re, ray
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import delete
        from ray._private.internal_api import memory_summary
        from airflow_ray_provider.hooks.ray import RayHook
        from airflow_ray_provider.cluster.owner import get_owner
        from airflow_ray_provider.xcom.retention import collect_garbage

        def held():
            return [k for k in ray.get(get_owner(RayHook().settings.namespace, 0).keys.remote())
                    if k.startswith("xcom_lifecycle/")]

        def plasma_mib():
            text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
            return float(re.search(r"Plasma memory usage (\\d+) MiB", text).group(1))

        RayHook().get_conn()
        start_mib, start_keys = plasma_mib(), len(held())
        runs = [xcom_dags.xcom_lifecycle_dag.test(run_conf={"mb": 2}) for _ in range(50)]
        loaded_mib, loaded_keys = plasma_mib(), len(held())
        states = sorted({s for dr in runs for s in ti_states(dr).values()})
        with create_session() as session:  # what deleting runs in the UI / REST API does to the rows
            session.execute(delete(DagRun).where(DagRun.dag_id == "xcom_lifecycle"))
        report = collect_garbage(grace_s=0)
        import time
        waited = time.monotonic()
        while plasma_mib() > start_mib + 1 and time.monotonic() - waited < 60:
            time.sleep(0.5)  # Ray frees released objects asynchronously
        emit(start_mib=start_mib, start_keys=start_keys, loaded_mib=loaded_mib, loaded_keys=loaded_keys,
             end_mib=plasma_mib(), end_keys=len(held()), states=states, released=len(report.released),
             freed_after_s=round(time.monotonic() - waited, 1))
    """, timeout=1500)
    assert result["states"] == ["success"], result
    assert result["loaded_keys"] == result["start_keys"] + 50 * 2
    assert result["loaded_mib"] >= result["start_mib"] + 50 * 2, result
    assert result["end_keys"] == result["start_keys"]
    assert result["end_mib"] <= result["start_mib"] + 1, result  # the store's used memory is back


def test_retention_releases_objects_of_finished_runs() -> None:
    result, _ = run_py("""
        from airflow_ray_provider.xcom.retention import collect_garbage
        dr = xcom_dags.xcom_lifecycle_dag.test(run_conf={"mb": 1})
        kept = collect_garbage(retention_s=3600, grace_s=0)
        expired = collect_garbage(retention_s=0, grace_s=0)
        emit(run_id=dr.run_id, kept=kept.released, expired=expired.released)
    """)
    assert not [k for k in result["kept"] if result["run_id"] in k]  # within retention: kept
    assert len([k for k in result["expired"] if result["run_id"] in k]) == 2
    from airflow_ray_provider.exceptions import RayXComObjectLost

    with pytest.raises(RayXComObjectLost, match=r"task 'blob'.*checkpoint=True"):
        value_of(stored("xcom_lifecycle", result["run_id"], "blob"))


def test_a_finished_run_starts_the_gc_in_the_background(airflow_home: Path, tmp_path: Path) -> None:
    """The provider's listener runs ``airflow-ray upkeep`` when a DAG run ends (here: retentions 0).

    That is ``xcom gc`` and ``checkpoints prune``.
    """
    from airflow_ray_provider.cluster.checkpoint import TaskCheckpoint, TaskKey
    from airflow_ray_provider.storage import make_store

    old = TaskCheckpoint(make_store(str(tmp_path / "ckpt"), None), TaskKey("old_dag", "old_run", "t"))
    old.write_result("old")
    result, output = run_py("""
        import os, time, ray
        from airflow_ray_provider.hooks.ray import RayHook
        from airflow_ray_provider.cluster.owner import get_owner
        dr = xcom_dags.xcom_lifecycle_dag.test(run_conf={"mb": 1})
        owner = get_owner(RayHook().settings.namespace, 0)
        mine = lambda: [k for k in ray.get(owner.keys.remote()) if k.startswith(f"xcom_lifecycle/{dr.run_id}/")]
        log_path = os.path.join(os.environ["AIRFLOW_HOME"], "airflow-ray-upkeep.log")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (os.path.exists(log_path) and "pruned" in open(log_path).read()):
            time.sleep(1)  # wait for the background gc, so it cannot touch later tests' objects
        emit(left=mine(), log=open(log_path).read() if os.path.exists(log_path) else "")
    """, env={"AIRFLOW__RAY__XCOM_GC_INTERVAL": "0", "AIRFLOW__RAY__XCOM_RETENTION": "0",
              "AIRFLOW__RAY__CHECKPOINT_RETENTION": "0", "AIRFLOW__RAY__CHECKPOINT_PATH": str(tmp_path / "ckpt")})
    assert "Started airflow-ray upkeep" in output
    assert re.search(r"past retention; released \d+", result["log"]), result["log"]
    assert result["left"] == [], result
    assert "pruned 1 task checkpoint folder(s)" in result["log"], result["log"]
    assert not (tmp_path / "ckpt" / "old_dag").exists()


# -- references read from the DB are validated (no Ray, no unpickling) ------------------------------
GOOD = {"__airflow_ray__": "object", "version": 2, "conn_id": "ray_default", "namespace": "airflow", "owner": 0,
        "origin": {"dag_id": "d", "task_id": "t", "run_id": "r", "map_index": -1, "xcom_key": "return_value"},
        "key": "d/r/t/-1/1/ab",
        "type": "int", "size": 3, "summary": "1", "nodes": ["ab12"], "checkpoint": None}


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 1}, "unsupported version 1"),
    ({"__airflow_ray__": "pickle"}, "kind 'pickle'"),
    ({"key": 7}, "field 'key' is missing or malformed"),
    ({"namespace": "../x"}, "field 'namespace' is missing or malformed"),
    ({"owner": -1}, "field 'owner' must be an integer"),
    ({"size": -5}, "'size' must be a non-negative integer"),
    ({"nodes": ["not hex!"]}, "'nodes' must be a list of hex node ids"),
    ({"payload": "gASVBQAAAAAAAACMAWGULg=="}, "unknown fields ['payload']"),
    ({"origin": {"dag_id": "d"}}, "'origin' must hold dag_id, task_id, run_id, map_index"),
])
def test_malformed_or_forged_references_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(RayXComReferenceError, match=re.escape(message)) as info:
        value_of({**GOOD, **change})
    if "origin" not in change:
        assert "task_id='t'" in str(info.value)  # the error says which XCom it was


def test_a_dict_using_the_reserved_marker_cannot_be_stored() -> None:
    with pytest.raises(ValueError, match="reserved key '__airflow_ray__'"):
        RayXComBackend.serialize_value({"__airflow_ray__": "object"}, task_id="t", dag_id="d", run_id="r")


def test_small_plain_values_serialize_like_base_xcom() -> None:
    from airflow.sdk.bases.xcom import BaseXCom

    for value in (42, "text", [1, 2], {"a": (1, 2)}):
        assert RayXComBackend.serialize_value(value) == BaseXCom.serialize_value(value)
        assert value_of(RayXComBackend.serialize_value(value)) == value
