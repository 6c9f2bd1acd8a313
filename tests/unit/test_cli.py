"""``airflow-ray checkpoints``: list, delete and prune task checkpoints (on local files).

The command runs once as a process (the ``python -m`` entry point), then in-process through ``main(argv)``,
which is what that entry point calls: the same parsing, output and exit codes, without an interpreter start
(several seconds each here) per call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from airflow_ray_provider import cli as cli_module
from airflow_ray_provider.cluster.checkpoint import TaskCheckpoint, TaskKey
from airflow_ray_provider.storage import make_store


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def test_cli_lists_deletes_and_prunes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "cli")
    store = make_store(root, None)
    for run in ("run_a", "run_b"):
        TaskCheckpoint(store, TaskKey("cli_dag", run, "t", -1)).write_result(run)

    def cli(*args: str) -> Ran:
        capsys.readouterr()
        try:
            code = cli_module.main(["checkpoints", *args, "--path", root])
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    process = subprocess.run([sys.executable, "-m", "airflow_ray_provider.cli", "checkpoints", "list", "--json",
                              "--path", root], capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert process.returncode == 0, process.stderr
    assert sorted(r["run"] for r in json.loads(process.stdout)) == ["run_a", "run_b"]
    listed = cli("list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == json.loads(process.stdout), listed
    assert {r["dag"] for r in json.loads(listed.stdout)} == {"cli_dag"}
    deleted = cli("delete", "--dag-id", "cli_dag", "--run-id", "run_a")
    assert deleted.returncode == 0 and "1 task" in deleted.stdout, deleted.stderr
    assert [r["run"] for r in json.loads(cli("list", "--json").stdout)] == ["run_b"]
    kept = cli("prune", "--older-than", "3600")
    assert "pruned 0" in kept.stdout, kept.stdout + kept.stderr
    pruned = cli("prune", "--older-than", "0")
    assert "pruned 1" in pruned.stdout, pruned.stdout + pruned.stderr
    assert json.loads(cli("list", "--json").stdout) == []
    bad = cli("delete", "--dag-id", "cli_dag")
    assert bad.returncode == 2 and "--run-id" in bad.stderr
