"""What is read back from outside the Ray cluster is authenticated before it is used, end to end.

XCom rows (anyone with the REST API's XCom edit, or a task returning a look-alike) and checkpoint
manifests (anyone who can write to the bucket) decide what is fetched, restored and unpickled. Each test
plays one such attacker against real Airflow and Ray and checks that nothing of theirs was loaded (a
pickle that writes a marker file when unpickled), and that the error says what was refused. The same
checks without Ray are in tests/unit/xcom/test_reference.py and tests/unit/cluster/test_checkpoint_trust.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from airflow_ray_provider.cluster.checkpoint import Store, TaskCheckpoint, TaskKey
from tests.dags import checkpoint_dags, trust_dags
from tests.dags.trust_dags import ATTACKER_KEY, Bomb
from tests.support.dag_runs import why
from tests.support.rows import pulled, task_states

pytestmark = pytest.mark.usefixtures("ray_cluster")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _log(capfd: pytest.CaptureFixture[str]) -> str:
    out = capfd.readouterr()
    return out.out + out.err


def test_copied_forged_and_look_alike_rows_are_refused_end_to_end(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """One DAG run: a row copied from another task, a forged row at a planted checkpoint, a string echo."""
    marker = tmp_path / "unpickled"
    dr = trust_dags.xcom_trust_dag.test(run_conf={"root": str(tmp_path / "planted"), "marker": str(marker)})
    output = _log(capfd)
    states = task_states(dr)
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
    assert pulled(dr, "read_echo") == "str:" + trust_dags.row_of(dr.run_id, "secret_a")[:40]


def test_a_mapped_output_read_whole_refuses_copied_rows(capfd: pytest.CaptureFixture[str],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A downstream task takes a mapped task's whole output; rows copied within it or from elsewhere are refused.

    Airflow hands the backend these values without their rows (LazyXComSequence, get_all); an untouched
    output still reads whole, in a plain task, in a ``@task.ray`` and through ``ti.xcom_pull``.
    """
    donor = trust_dags.xcom_trust_donor_dag.test()
    assert task_states(donor) == {"donor": "success"}
    _log(capfd)  # the donor's own output names its value: only the mapped run's output is looked at
    caplog.clear()
    dr = trust_dags.xcom_trust_mapped_dag.test(run_conf={"donor_run_id": donor.run_id})
    output = _log(capfd) + caplog.text  # the tasks' log records
    states = task_states(dr)
    assert states["tamper"] == "success", why(output)
    expected = [f"value of map index {i}" for i in range(3)]
    for reader in ("whole_untouched", "whole_in_ray_untouched", "pull_all_untouched"):
        assert states[reader] == "success" and pulled(dr, reader) == expected, (reader, why(output))
    refused = ("whole_copied_down", "whole_in_ray_copied_up", "pull_all_copied_up", "whole_foreign",
               "whole_in_ray_foreign", "whole_other_dag", "whole_in_ray_other_dag")
    assert {reader: states[reader] for reader in refused} == dict.fromkeys(refused, "failed"), why(output)
    # Map index 0 read as item 1; map index 2 read as item 0 and again as item 2; another task's row.
    assert re.search(r"read as item 1 of the mapped output of dag 'xcom_trust_mapped', task 'copied_down'.* was "
                     r"written for map index 0", output), why(output)
    assert re.search(r"reference of map index 2 of dag 'xcom_trust_mapped', task 'copied_up'.* was read twice from "
                     r"one mapped output \(items 0 and 2\)", output), why(output)
    assert re.search(r"read from the row with task_id='foreign' was written for task_id='secret'", output), \
        why(output)
    assert re.search(r"read from the row with dag_id='xcom_trust_mapped'.* was written for dag_id='xcom_trust_donor'",
                     output), why(output)
    assert "DONOR VALUE" not in output, why(output)  # refused before anything read the donor's value


def test_a_planted_checkpoint_is_not_reused_on_rerun(tmp_path: Path, ray_connection: Callable[..., object],
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """The no-recompute check reads the manifest with no expected digest: only the signature anchors it."""
    marker, bomb = tmp_path / "produce.log", tmp_path / "unpickled"
    root = tmp_path / "ckpt"
    ray_connection(checkpoint_path=str(root))

    def run() -> object:
        dr = checkpoint_dags.ckpt_reuse_dag.test(run_after=checkpoint_dags.START, logical_date=checkpoint_dags.START,
                                                run_conf={"marker": str(marker), "n": 4})
        assert set(task_states(dr).values()) == {"success"}, task_states(dr)
        return dr

    first = run()
    assert pulled(first, "total") == 14 and lines(marker) == ["produce 4"]
    key = TaskKey("ckpt_reuse", first.run_id, "produce", -1)
    manifest = json.loads((root / "/".join(key.segments()) / "result" / "manifest.json").read_text())
    # The attacker copies the fingerprint the no-recompute check compares, so only the signature differs.
    TaskCheckpoint(Store(str(root), secret=ATTACKER_KEY), key).write_result(Bomb(str(bomb)),
                                                                             fingerprint=manifest["fingerprint"])
    bomb.unlink(missing_ok=True)
    capfd.readouterr()
    again = run()
    output = _log(capfd)
    assert pulled(again, "total") == 14 and lines(marker) == ["produce 4", "produce 4"]  # recomputed
    assert "Not reusing the checkpoint" in output and "not signed with this deployment's" in output
    assert not bomb.exists()
