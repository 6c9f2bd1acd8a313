"""XCom reference rows: what is read back from the metadata DB is validated and authenticated, no Ray needed.

A row decides what is fetched, restored and unpickled, and anyone with the REST API's XCom edit can write
one: every field is bound by the deployment's signature, malformed rows are refused by name, and a string
is never parsed as a reference.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from airflow_ray_provider.exceptions import RayXComReferenceError
from airflow_ray_provider.xcom.backend import RayXComBackend
from airflow_ray_provider.xcom.reference import (
    SIGNATURE,
    Location,
    Origin,
    RayObject,
    RayObjectDict,
    parse_reference,
    signed_json,
)
from tests.dags.trust_dags import ATTACKER_KEY
from tests.support.rows import value_of


def test_the_row_of_a_1_gib_object_with_the_longest_ids_airflow_allows_stays_under_4_kib() -> None:
    import numpy as np

    from airflow_ray_provider.cluster.describe import MAX_SUMMARY, describe
    from airflow_ray_provider.xcom.reference import Location, Origin, RayObject, parse_reference, signed_json

    gib = np.broadcast_to(np.float64(0.5), (2**27,))  # 1 GiB as numpy counts it, without the memory
    about = describe(gib)
    assert about["size_estimate"] == 2**30
    dag_id, task_id, run_id = "d" * 250, "t" * 250, "r" * 250  # ID_LEN in Airflow's models
    key = "/".join((dag_id, run_id, task_id, "9999", "3", "0123abcd"))
    ref = RayObject(key=key, location=Location("ray_default", "airflow", 0), type=about["type"], size=2**30,
                    summary=about["summary"], nodes=tuple(f"{n:056x}" for n in range(4)),
                    origin=Origin(dag_id, task_id, run_id, 9999),
                    checkpoint={"uri": f"s3://a-bucket/airflow-ray/{dag_id}/{run_id}/{task_id}/9999/result",
                                "sha256": "0" * 64, "conn_id": "aws_default", "part": None})
    row = signed_json(ref, secret=b"k" * 32)
    assert len(json.dumps(row)) < 4096, len(json.dumps(row))
    assert list(row)[:2] == ["summary", "type"] and row["summary"] == "ndarray shape=(134217728,) dtype=float64"
    assert parse_reference(row, secret=b"k" * 32) == ref
    # A summary cannot grow the row: twelve 1,000-character column names are cut.
    import pandas as pd

    wide = describe(pd.DataFrame({f"{n}{'c' * 1000}": [1] for n in range(12)}))
    assert len(wide["summary"]) == MAX_SUMMARY and wide["summary"].startswith("DataFrame 1 rows x 12 columns [0cc")


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


def a_reference(**checkpoint: Any) -> RayObject:
    return RayObject(key="d/r/t/-1/1/ab", location=Location("ray_default", "airflow", 0), type="int", size=3,
                     summary="1", nodes=("ab12",), origin=Origin("d", "t", "r", -1),
                     checkpoint={"uri": "/ckpt/d/r/t/-1/result/manifest.json", "sha256": "0" * 64,
                                 "conn_id": None, "part": None, **checkpoint})


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
