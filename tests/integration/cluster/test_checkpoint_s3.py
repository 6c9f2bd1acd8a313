"""The checkpoint store on a real S3 server (SeaweedFS on loopback, tests/support/s3server.py).

The store-level tests of tests/unit/cluster/test_checkpoint.py run here again, each with an S3 ``store``
(pytest collects the imported tests in this module, where ``store`` is the fixture below); then what only
S3 has: the two S3 clients, credentials from an Airflow connection, an unreachable endpoint.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airflow_ray_provider.cluster.checkpoint import Store, TaskCheckpoint, TaskKey
from airflow_ray_provider.exceptions import CheckpointError
from airflow_ray_provider.storage import make_store
from tests.support.s3server import BUCKET, S3_ACCESS_KEY, S3_SECRET_KEY, aws_connection, s3_client
from tests.unit.cluster.test_checkpoint import (  # noqa: F401 - collected here, with the S3 store below
    RUN_ID,
    task_checkpoint,
    test_a_data_file_of_another_length_is_refused,
    test_a_failed_write_leaves_no_files_and_the_last_result_intact,
    test_a_flipped_byte_is_refused_and_never_unpickled,
    test_a_manifest_changed_after_the_reference_was_written_is_refused,
    test_a_partial_write_is_never_read,
    test_progress_save_and_load,
    test_reference_locations_must_match_their_task,
    test_restored_arrays_keep_their_layout_and_stay_writable,
    test_split_results_store_each_item_so_one_item_loads_alone,
    test_tune_storage_is_a_pyarrow_view_of_the_same_store,
    test_values_round_trip_in_their_columnar_and_array_formats,
)


@pytest.fixture
def store(s3_endpoint: str) -> Store:
    return make_store(f"s3://{BUCKET}/unit-{uuid.uuid4().hex[:8]}", "ckpt_s3")


def test_s3_data_files_go_through_pyarrow_unless_an_option_needs_s3fs(s3_endpoint: str) -> None:
    plain = make_store(f"s3://{BUCKET}/route", "ckpt_s3")
    data_fs, root = plain.data_filesystem()
    assert type(data_fs).__name__ == "ArrowFSWrapper" and root == f"{BUCKET}/route"
    assert type(plain.filesystem()[0]).__name__ == "S3FileSystem"  # manifests and listings: s3fs
    tuned = Store(plain.root, {**plain.storage_options, "max_concurrency": 2}, secret=plain.secret)
    assert type(tuned.data_filesystem()[0]).__name__ == "S3FileSystem"
    # Written through one, read through the other: the same objects.
    TaskCheckpoint(plain, TaskKey("unit_dag", RUN_ID, "routed")).write_result(np.arange(1000))
    assert np.array_equal(TaskCheckpoint(tuned, TaskKey("unit_dag", RUN_ID, "routed")).load_result(), np.arange(1000))


def test_s3_credentials_and_endpoint_come_from_the_airflow_connection(s3_endpoint: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The server accepts one key only, so a write that lands was signed with the connection's key."""
    store = make_store(f"s3://{BUCKET}/creds", "ckpt_s3")
    assert store.storage_options["endpoint_url"] == s3_endpoint
    assert store.storage_options["key"] == S3_ACCESS_KEY and store.storage_options["secret"] == S3_SECRET_KEY
    assert S3_ACCESS_KEY not in repr(store) and S3_SECRET_KEY not in repr(store)  # never in a repr or a log line
    task_checkpoint(store).write_result("via the connection")
    keys = [o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="creds/")["Contents"]]
    assert any(k.endswith("/result/manifest.json") for k in keys)
    # The same server and bucket through a connection with a wrong secret: refused, and named in the error.
    monkeypatch.setenv("AIRFLOW_CONN_CKPT_S3_WRONG", aws_connection(s3_endpoint, password="not-" + S3_SECRET_KEY))
    wrong = make_store(f"s3://{BUCKET}/creds-wrong", "ckpt_s3_wrong")
    with pytest.raises(CheckpointError, match=f"s3://{BUCKET}/creds-wrong/unit_dag") as err:
        task_checkpoint(wrong).write_result("refused")
    assert S3_SECRET_KEY not in str(err.value)
    assert "Contents" not in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="creds-wrong/")


def test_an_unreachable_store_fails_with_the_location(s3_endpoint: str) -> None:
    store = make_store(f"s3://{BUCKET}/down", "ckpt_s3_down")
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=f"s3://{BUCKET}/down/unit_dag") as err:
        task_checkpoint(store).write_result([1])
    assert "failed" in str(err.value)
    assert time.monotonic() - started < 120


def test_the_ray_connection_sets_the_default_store(s3_endpoint: str, connection: Any, tmp_path: Path) -> None:
    from airflow_ray_provider.storage import store_for

    conn_id = connection("ray_ckpt", extra={"checkpoint_path": f"s3://{BUCKET}/from-conn",
                                            "checkpoint_conn_id": "ckpt_s3",
                                            "checkpoint_storage_options": {"max_concurrency": 1}})
    store, store_conn = store_for(conn_id)
    assert store.root == f"s3://{BUCKET}/from-conn" and store_conn == "ckpt_s3"
    assert store.storage_options["max_concurrency"] == 1 and store.storage_options["endpoint_url"] == s3_endpoint
    assert store.filesystem()[0].max_concurrency == 1
    override, override_conn = store_for(conn_id, f"file://{tmp_path}", "")
    assert override.root == str(tmp_path) and not override_conn
    bare, _ = store_for(connection("ray_bare", extra={}))
    assert bare.root.endswith("/ray-checkpoints") and os.path.isabs(bare.root)
