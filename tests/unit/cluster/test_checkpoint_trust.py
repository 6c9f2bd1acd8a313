"""Checkpoint manifests are authenticated before anything is unpickled.

Someone who can write to the bucket but does not hold ``[ray] secret_key`` plants manifests and pickles (a
pickle that writes a marker file when it is loaded); every reader refuses them, and errors never echo a digest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_ray_provider.cluster.checkpoint import Store, TaskCheckpoint, TaskKey, parse_manifest
from airflow_ray_provider.config import secret_key
from airflow_ray_provider.exceptions import CheckpointCorrupted
from airflow_ray_provider.storage import make_store
from tests.dags.trust_dags import ATTACKER_KEY, Bomb


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
