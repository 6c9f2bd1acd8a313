"""The embedded head's files, without starting one: state files, tokens, auth mode, stale process marks.

What starts a head (concurrent first callers, the CLI, the private head's sockets and files) is in
tests/system/test_local_cluster.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from airflow_ray_provider import local_cluster
from airflow_ray_provider.exceptions import LocalClusterError
from airflow_ray_provider.local_cluster import (
    LocalRayCluster,
    load_or_create_token,
    read_token_file,
)
from tests.support.heads import file_mode, forge_state


def test_malformed_state_file_is_refused(tmp_path: Path) -> None:
    cluster = LocalRayCluster(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    cluster.state_file.write_text(json.dumps({"address": "x", "gcs_port": "not-a-port"}))
    with pytest.raises(LocalClusterError, match="Malformed state file"):
        cluster.read_state()
    cluster.state_file.write_text("{not json")
    with pytest.raises(LocalClusterError, match="Unreadable state file"):
        cluster.read_state()


def test_token_file_others_can_read_or_not_ours_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "ray" / "auth-token"
    token = load_or_create_token(token_file)
    assert file_mode(token_file) == 0o600 and file_mode(token_file.parent) == 0o700
    assert load_or_create_token(token_file) == token  # created once, then reused
    os.chmod(token_file, 0o640)
    with pytest.raises(LocalClusterError, match=re.escape(str(token_file))):
        load_or_create_token(token_file)
    os.chmod(token_file, 0o600)
    if os.getuid() == 0:  # only root can give a file away; as another user this path cannot arise
        os.chown(token_file, 65534, 65534)
        with pytest.raises(LocalClusterError, match=rf"{re.escape(str(token_file))}: it must be owned by uid 0"):
            read_token_file(token_file)


def test_concurrent_token_creation_agrees(tmp_path: Path) -> None:
    token_file = tmp_path / "ray" / "auth-token"
    code = ("import sys, pathlib; from airflow_ray_provider.local_cluster import load_or_create_token; "
            "print(load_or_create_token(pathlib.Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(token_file)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    tokens = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(tokens) == 1 and tokens == {read_token_file(token_file)}, tokens


def test_auth_opt_out_is_explicit_and_warned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    cluster = LocalRayCluster(tmp_path / "ray")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    env, mode, token_file = cluster._auth_env()
    assert mode == "token" and env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token_file)}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with caplog.at_level(logging.WARNING, logger="airflow_ray_provider.local_cluster"):
        env, mode, token_file = cluster._auth_env()
    assert (env, mode, token_file) == ({"RAY_AUTH_MODE": "disabled"}, "disabled", None)
    assert "WITHOUT token authentication because RAY_AUTH_MODE=disabled" in caplog.text


def test_state_whose_process_marks_do_not_match_is_not_signalled(
        tmp_path: Path, unrelated_process: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture) -> None:
    """The gcs_server once recorded at that pid is gone and the pid now belongs to someone else."""
    cluster = LocalRayCluster(tmp_path / "ray")
    now = psutil.Process(unrelated_process.pid).create_time()
    for mark in ({"pid": unrelated_process.pid, "create_time": now - 3600, "name": "gcs_server"},  # pid reused
                 {"pid": unrelated_process.pid, "create_time": now, "name": "sleep"}):  # same process, not Ray's
        forge_state(cluster, unrelated_process.pid, version=2, auth_mode="token", session_started_at=now - 1,
                     processes=[mark])
        assert cluster.status() is None
        with caplog.at_level(logging.WARNING, logger="airflow_ray_provider.local_cluster"):
            assert cluster.stop() is False
        assert "no process was signalled" in caplog.text and not cluster.state_file.exists()
        assert unrelated_process.poll() is None
        caplog.clear()


def test_state_file_steering_clients_elsewhere_is_refused(tmp_path: Path) -> None:
    cluster = LocalRayCluster(tmp_path / "ray")
    forge_state(cluster, 12345, address="192.0.2.99:6379")
    with pytest.raises(LocalClusterError, match=r"Malformed state file .*is not 127\.0\.0\.1:"):
        cluster.read_state()
    os.chmod(cluster.state_file, 0o666)  # others could have rewritten it
    with pytest.raises(LocalClusterError, match=re.escape(str(cluster.state_file))):
        cluster.read_state()


def test_a_token_the_provider_set_is_not_taken_for_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RayHook puts a connection's token into os.environ for Ray's loader; nothing started later may adopt it."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(name, "placeholder")  # registered, so teardown restores the environment
    monkeypatch.setattr(local_cluster, "_PROVIDER_AUTH_ENV", {})
    other = "f" * 64
    local_cluster.set_provider_auth_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=other)
    assert os.environ["RAY_AUTH_TOKEN"] == other  # Ray's loader still finds it
    assert "RAY_AUTH_TOKEN" not in local_cluster.user_environ()
    assert local_cluster.ray_process_env().get("RAY_AUTH_TOKEN") != other  # a probe or joined node
    cluster = LocalRayCluster(tmp_path / "ray")
    mode, token, token_file = cluster._auth_policy()
    assert (mode, token_file) == ("token", cluster.token_file) and token != other  # its own token file


def test_the_users_own_token_stays_theirs_after_the_provider_sets_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's RAY_AUTH_TOKEN runs the embedded head; the first task's connect sets the same value. Seen
    in `airflow dags test`: had it been recorded as the provider's, the next task asked no token and was
    refused ("differs in the auth token")."""
    monkeypatch.setattr(local_cluster, "_PROVIDER_AUTH_ENV", {})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "u" * 64)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    local_cluster.set_provider_auth_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="u" * 64)
    assert local_cluster.user_environ()["RAY_AUTH_TOKEN"] == "u" * 64
    assert "RAY_AUTH_MODE" not in local_cluster.user_environ()  # this one the provider did set
    assert LocalRayCluster(tmp_path / "ray")._auth_policy()[1:] == ("u" * 64, None)


# -- a start that fails: a stand-in `ray` command, since no real one fails on demand ------------------------
def _failing_ray(tmp_path: Path, message: str) -> Path:
    """A `ray` command that prints ``message`` as `ray start` prints its last error, counts calls, and fails."""
    script = tmp_path / "ray"
    script.write_text(f"#!/bin/sh\necho call >> {tmp_path / 'calls'}\necho '{message}'\nexit 1\n")
    script.chmod(0o755)
    return script


def test_a_start_that_times_out_is_tried_again_until_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Ray's fixed startup windows: more than START_ATTEMPTS tries, bounded by START_DEADLINE_S.

    One attempt and a 10 s deadline: any second try proves it, and a failing `ray` that takes seconds on a loaded
    machine still gets one (run 24: 3 tries of 0.4 s each did not fit the 1 s deadline this test used to have)."""
    monkeypatch.setattr(local_cluster, "START_ATTEMPTS", 1)
    monkeypatch.setattr(local_cluster, "START_DEADLINE_S", 10.0)
    monkeypatch.setattr(local_cluster, "START_RETRY_PAUSE_S", 0.1)
    ray = _failing_ray(tmp_path, "Exception: The current node timed out during startup.")
    cluster = LocalRayCluster(tmp_path / "home", ray_command=str(ray))
    with caplog.at_level(logging.WARNING, logger="airflow_ray_provider.local_cluster"), \
            pytest.raises(LocalClusterError, match=r"failed \(exit code 1\).*the last error: Exception: The current "
                                                   r"node timed out during startup"):
        cluster.ensure_running()
    calls = len((tmp_path / "calls").read_text().split())
    assert calls > local_cluster.START_ATTEMPTS
    assert "attempt 1 until 10s have passed" in caplog.text, caplog.text


def test_a_start_that_fails_otherwise_gives_up_after_its_attempts(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other failure (a bad option, a port taken) is not waited out: START_ATTEMPTS tries, then the error."""
    monkeypatch.setattr(local_cluster, "START_RETRY_PAUSE_S", 0.01)
    ray = _failing_ray(tmp_path, "ValueError: --num-cpus must be a number")
    cluster = LocalRayCluster(tmp_path / "home", ray_command=str(ray))
    with pytest.raises(LocalClusterError, match=r"attempt 3,.*the last error: ValueError: --num-cpus"):
        cluster.ensure_running()
    assert len((tmp_path / "calls").read_text().split()) == local_cluster.START_ATTEMPTS


def test_a_port_handed_out_is_not_handed_out_again_by_any_process(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Between ``free_ports`` returning a port and its user binding it, the OS offers it to the next bind(0):
    two sessions starting at once were given the same port (suite run 9). A port handed out is kept from every
    process of the user for PORT_HOLD_S."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = local_cluster.free_ports(40)
    second = local_cluster.free_ports(40)
    code = "from airflow_ray_provider.local_cluster import free_ports; print(' '.join(map(str, free_ports(40))))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)}, check=True)
    third = [int(p) for p in other.stdout.split()]
    assert len(set(first + second + third)) == 120
    record = local_cluster.handed_out_ports_file()
    assert record.parent == tmp_path / "airflow-ray-provider" and file_mode(record) == 0o600
    assert {int(line.split()[0]) for line in record.read_text().splitlines()} == set(first + second + third)


def test_the_record_of_ports_drops_old_and_garbled_entries_and_is_never_required(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    record = local_cluster.handed_out_ports_file()
    record.parent.mkdir(parents=True)
    old = local_cluster.free_ports(1)[0]
    record.write_text(f"{old} {time.time() - local_cluster.PORT_HOLD_S - 1}\nnot a line\n70000\n")
    local_cluster.free_ports(3)
    lines = record.read_text().splitlines()
    assert len(lines) == 3 and str(old) not in [line.split()[0] for line in lines]  # the old entry is gone
    # No usable cache folder (a file stands where it should be): ports are still handed out.
    monkeypatch.setenv("XDG_CACHE_HOME", str(record))
    assert len(set(local_cluster.free_ports(5))) == 5
