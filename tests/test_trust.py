"""What is read back from outside the Ray cluster is authenticated before it is used.

XCom rows (anyone with the REST API's XCom edit, or a task returning a look-alike) and
checkpoint manifests (anyone who can write to the bucket) decide what is fetched,
restored and unpickled. Each test plays one such attacker against real Airflow and Ray
and checks that nothing of theirs was loaded (a pickle that writes a marker file when
unpickled), and that the error says what was refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from airflow_ray_provider.cluster.checkpoint import Store, TaskCheckpoint, TaskKey, parse_manifest
from airflow_ray_provider.config import secret_key
from airflow_ray_provider.exceptions import CheckpointCorrupted, RayXComReferenceError
from airflow_ray_provider.storage import make_store
from airflow_ray_provider.xcom.reference import (
    SIGNATURE,
    Location,
    Origin,
    RayObject,
    RayObjectDict,
    parse_reference,
    signed_json,
)
from tests.dag_runs import run_py, session_ray_conn
from tests.dags.trust_dags import ATTACKER_KEY, Bomb
from tests.test_xcom_backend import value_of


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def a_reference(**checkpoint: Any) -> RayObject:
    return RayObject(key="d/r/t/-1/1/ab", location=Location("ray_default", "airflow", 0), type="int", size=3,
                     summary="1", nodes=("ab12",), origin=Origin("d", "t", "r", -1),
                     checkpoint={"uri": "/ckpt/d/r/t/-1/result/manifest.json", "sha256": "0" * 64,
                                 "conn_id": None, "part": None, **checkpoint})


# -- XCom rows -------------------------------------------------------------------------------------
@pytest.mark.usefixtures("ray_cluster")
def test_copied_forged_and_look_alike_rows_are_refused_end_to_end(tmp_path: Path) -> None:
    """One DAG run: a row copied from another task, a forged row at a planted checkpoint, a string echo."""
    marker = tmp_path / "unpickled"
    result, output = run_py(f"""
        from tests.dags import trust_dags
        dr = trust_dags.xcom_trust_dag.test(run_conf={{"root": {str(tmp_path / 'planted')!r},
                                                      "marker": {str(marker)!r}}})
        emit(states=task_states(dr), echo=pulled(dr, "read_echo"), row=trust_dags.row_of(dr.run_id, "secret_a"))
    """)
    states = result["states"]
    assert states["tamper"] == "success" and states["echo"] == "success", output[-6000:]
    # A valid row copied over another task's: refused, naming both.
    assert states["read_copied"] == "failed"
    assert re.search(r"read from the row with task_id='value_b'.* was written for task_id='secret_a'", output)
    # A forged reference whose checkpoint digest is right: refused, nothing unpickled anywhere.
    assert states["read_forged"] == "failed"
    assert "is not signed with this deployment's [ray] secret_key" in output
    assert not marker.exists(), "the planted pickle was loaded"
    # Text that looks like a reference is text.
    assert states["read_echo"] == "success"
    assert result["echo"] == "str:" + result["row"][:40]


def test_a_string_is_never_parsed_as_a_reference() -> None:
    row = json.dumps(signed_json(a_reference()))
    assert value_of(row) == row
    assert value_of(" " + row) == " " + row


def test_every_field_of_a_reference_is_bound_by_its_signature() -> None:
    """Root, connection, digest, owner, key, origin: change any one and the row is refused."""
    good = signed_json(RayObjectDict({"x": a_reference()}, location=Location("ray_default", "airflow", 0),
                                     origin=Origin("d", "t", "r", -1)))
    parse_reference(good)  # the untouched row is accepted
    item = good["items"]["x"]
    changes: list[tuple[str, Any]] = [
        ("conn_id", "other_conn"), ("namespace", "other"), ("owner", 1), ("summary", "edited"), ("size", 4),
        ("origin", {**good["origin"], "task_id": "other"}), ("origin", {**good["origin"], "xcom_key": "x"}),
        ("items", {"x": {**item, "key": "d/r/t/-1/1/cd"}}),
        ("items", {"x": {**item, "checkpoint": {**item["checkpoint"], "uri": "/evil/d/r/t/-1/result/manifest.json"}}}),
        ("items", {"x": {**item, "checkpoint": {**item["checkpoint"], "sha256": "1" * 64}}}),
        ("items", {"x": {**item, "checkpoint": {**item["checkpoint"], "conn_id": "attacker_s3"}}}),
        ("items", {"y": item}),
    ]
    for name, value in changes:
        with pytest.raises(RayXComReferenceError, match="not signed with this deployment's") as info:
            value_of({**good, name: value})
        assert "0" * 64 not in str(info.value)
    for signature in (None, "", "hmac-sha256:" + "0" * 64, good[SIGNATURE].upper(), 7):
        with pytest.raises(RayXComReferenceError, match="not signed"):
            parse_reference({**good, SIGNATURE: signature})
    with pytest.raises(RayXComReferenceError, match="not signed"):  # signed, but with another deployment's key
        parse_reference(signed_json(a_reference(), ATTACKER_KEY))


def test_a_reference_from_an_older_unsigned_version_names_the_fix() -> None:
    old = {k: v for k, v in signed_json(a_reference()).items() if k != SIGNATURE}
    with pytest.raises(RayXComReferenceError, match=r"unsupported version 1 .*rerun the task"):
        parse_reference({**old, "version": 1})


# -- checkpoint manifests --------------------------------------------------------------------------
def test_a_planted_manifest_is_refused_by_every_reader(tmp_path: Path) -> None:
    """Someone who can write to the bucket, not holding the secret, plants a result and a progress save."""
    marker = tmp_path / "unpickled"
    root = str(tmp_path / "ckpt")
    key = TaskKey("d", "r", "t", -1)
    ours = TaskCheckpoint(make_store(root, None), key)
    planted = TaskCheckpoint(Store(root, secret=ATTACKER_KEY), key)
    planted.write_result(Bomb(str(marker)), fingerprint="a" * 64)
    planted.save("progress", Bomb(str(marker)))
    marker.unlink(missing_ok=True)  # the attacker's own write does not count
    for read in (ours.read_manifest, ours.load_result, lambda: ours.load("progress")):
        with pytest.raises(CheckpointCorrupted, match="not signed with this deployment's"):
            read()
    assert not marker.exists()
    # A signed manifest moved to another slot of the same task (result -> progress) is refused too.
    ours.write_result(42)
    fs, _ = ours.store.filesystem()
    folder = ours.result_uri.split("://", 1)[1].rsplit("/", 2)[0]
    fs.copy(f"{folder}/result/manifest.json", f"{folder}/state/progress/manifest.json")
    with pytest.raises(CheckpointCorrupted, match="was written for 'result', not 'state/progress'"):
        ours.load("progress")


def test_digest_errors_never_echo_a_digest(tmp_path: Path) -> None:
    ckpt = TaskCheckpoint(make_store(str(tmp_path / "ckpt"), None), TaskKey("d", "r", "t", -1))
    info = ckpt.write_result(list(range(100)))
    fs, _ = ckpt.store.filesystem()
    body = fs.cat_file(info["uri"].split("://", 1)[1])
    wanted = "1" * 64
    with pytest.raises(CheckpointCorrupted) as err:
        parse_manifest(body, "file:///x", expected_sha256=wanted, secret=secret_key())
    assert info["sha256"] not in str(err.value) and wanted not in str(err.value)
    assert "does not match the digest its XCom reference recorded" in str(err.value)


@pytest.mark.usefixtures("ray_cluster")
def test_a_planted_checkpoint_is_not_reused_on_rerun(tmp_path: Path) -> None:
    """The no-recompute check reads the manifest with no expected digest: only the signature anchors it."""
    marker, bomb = tmp_path / "produce.log", tmp_path / "unpickled"
    root = tmp_path / "ckpt"
    env = session_ray_conn(checkpoint_path=str(root))
    code = f"""
        dr = checkpoint_dags.ckpt_reuse_dag.test(run_after=checkpoint_dags.START, logical_date=checkpoint_dags.START,
                                                run_conf={{"marker": {str(marker)!r}, "n": 4}})
        emit(states=task_states(dr), run_id=dr.run_id, total=pulled(dr, "total"))
    """
    first, _ = run_py(code, env=env)
    assert first["total"] == 14 and lines(marker) == ["produce 4"]
    key = TaskKey("ckpt_reuse", first["run_id"], "produce", -1)
    manifest = json.loads((root / "/".join(key.segments()) / "result" / "manifest.json").read_text())
    # The attacker copies the fingerprint the no-recompute check compares, so only the signature differs.
    TaskCheckpoint(Store(str(root), secret=ATTACKER_KEY), key).write_result(Bomb(str(bomb)),
                                                                             fingerprint=manifest["fingerprint"])
    bomb.unlink(missing_ok=True)
    again, output = run_py(code, env=env)
    assert set(again["states"].values()) == {"success"}, output[-6000:]
    assert again["total"] == 14 and lines(marker) == ["produce 4", "produce 4"]  # recomputed
    assert "Not reusing the checkpoint" in output and "not signed with this deployment's" in output
    assert not bomb.exists()
