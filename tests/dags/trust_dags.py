"""DAGs for tests/integration/test_trust.py: what an attacker who can write XCom rows or a bucket can and cannot do.

``tamper`` plays the attacker with write access to the metadata DB (what the REST API's
XCom edit gives): it copies one task's reference row over another's and writes a forged
reference that points at a checkpoint the attacker planted. Plain SQL on the test's SQLite
file, as a DB editor would do it; the provider sees only the rows.
"""

from __future__ import annotations

import json
import os
import sqlite3

import pendulum
from airflow.sdk import dag, task

START = pendulum.datetime(2026, 1, 1, tz="UTC")


def _db() -> sqlite3.Connection:
    url = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    return sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)


def row_of(run_id: str, task_id: str) -> str:
    with _db() as db:
        (value,) = db.execute("SELECT value FROM xcom WHERE dag_id='xcom_trust' AND run_id=? AND task_id=? "
                              "AND key='return_value'", (run_id, task_id)).fetchone()
    return value if isinstance(value, str) else json.dumps(value)


class Bomb:
    """Unpickling it writes ``marker``: proof that a planted pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (_touch, (self.marker,))


def _touch(path: str) -> str:
    with open(path, "a") as f:
        f.write("unpickled\n")
    return "boom"


ATTACKER_KEY = b"not-the-deployment-secret-but-32-bytes-long"


def forged_row(run_id: str, root: str, marker: str) -> str:
    """What an attacker with bucket and DB write access but without the secret can make.

    They plant a checkpoint (with the provider's own code, signed with a key of their own) and
    a reference to it whose digest is right. Only the signatures can give it away.
    """
    from airflow_ray_provider.cluster.checkpoint import Store, TaskCheckpoint, TaskKey
    from airflow_ray_provider.xcom.reference import Location, Origin, RayObject, signed_json

    planted = TaskCheckpoint(Store(root, secret=ATTACKER_KEY), TaskKey("xcom_trust", run_id, "victim_f", -1))
    info = planted.write_result(Bomb(marker))
    ref = RayObject(key=f"xcom_trust/{run_id}/victim_f/-1/1/forged", location=Location("ray_default", "tests", 0),
                    type="int", size=1, summary="0", origin=Origin("xcom_trust", "victim_f", run_id, -1),
                    checkpoint={"uri": info["uri"], "sha256": info["sha256"], "conn_id": None, "part": None})
    return json.dumps(signed_json(ref, ATTACKER_KEY))


def set_row(run_id: str, task_id: str, value: str, map_index: int = -1, dag_id: str = "xcom_trust") -> None:
    with _db() as db:
        db.execute("UPDATE xcom SET value=? WHERE dag_id=? AND run_id=? AND task_id=? AND map_index=? "
                   "AND key='return_value'", (value, dag_id, run_id, task_id, map_index))


def mapped_row(run_id: str, task_id: str, map_index: int = -1, dag_id: str = "xcom_trust_mapped") -> str:
    with _db() as db:
        (value,) = db.execute("SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id=? AND map_index=? "
                              "AND key='return_value'", (dag_id, run_id, task_id, map_index)).fetchone()
    return value if isinstance(value, str) else json.dumps(value)


@dag(dag_id="xcom_trust", schedule=None, start_date=START, params={"root": "", "marker": ""})
def xcom_trust():
    @task.ray
    def secret_a() -> str:
        return "the value of a"

    @task.ray
    def value_b() -> str:
        return "the value of b"

    @task.ray
    def victim_f() -> int:
        return 0

    @task
    def echo(run_id: str | None = None) -> str:
        """A plain task returning text that looks exactly like a reference (an HTTP body, a conf echo)."""
        return row_of(run_id, "secret_a")

    @task
    def tamper(params: dict, run_id: str | None = None) -> None:
        set_row(run_id, "value_b", row_of(run_id, "secret_a"))  # a valid row, copied to another task
        # A forged row, pointing at a planted checkpoint.
        set_row(run_id, "victim_f", forged_row(run_id, params["root"], params["marker"]))

    @task
    def read_copied(b: str) -> str:
        return b

    @task.ray
    def read_forged(f: object) -> str:
        return repr(f)

    @task
    def read_echo(text: object) -> str:
        return type(text).__name__ + ":" + str(text)[:40]

    a, b, f = secret_a(), value_b(), victim_f()
    done = tamper()
    [a, b, f] >> done
    text = echo()
    a >> text
    for reader in (read_copied(b), read_forged(f)):
        done >> reader
    read_echo(text)


xcom_trust_dag = xcom_trust()


@dag(dag_id="xcom_trust_donor", schedule=None, start_date=START)
def xcom_trust_donor():
    """Another DAG, whose value ``xcom_trust_mapped`` copies into one of its own mapped rows."""

    @task.ray
    def donor() -> str:
        return "DONOR VALUE (dag xcom_trust_donor)"

    donor()


xcom_trust_donor_dag = xcom_trust_donor()


@dag(dag_id="xcom_trust_mapped", schedule=None, start_date=START, params={"donor_run_id": ""})
def xcom_trust_mapped():
    """A mapped task's whole output, read as Airflow reads it (LazyXComSequence, get_all), after ``tamper``
    copied rows: one over another map index of the same task (both ways), another task's over map index 2, and
    another DAG's (``xcom_trust_donor``, the run named by ``params.donor_run_id``) over map index 1."""

    @task.ray
    def secret() -> str:
        return "the secret"

    @task.ray
    def item(i: int) -> str:
        return f"value of map index {i}"

    @task
    def tamper(params: dict, run_id: str | None = None) -> None:
        def copy(source: tuple[str, int], target: tuple[str, int]) -> None:
            set_row(run_id, target[0], mapped_row(run_id, *source), target[1], dag_id="xcom_trust_mapped")

        copy(("copied_down", 0), ("copied_down", 1))  # map index 0 read again as item 1
        copy(("copied_up", 2), ("copied_up", 0))  # map index 2 read as item 0, and again as item 2
        copy(("secret", -1), ("foreign", 2))  # another task's value in map index 2
        donated = mapped_row(params["donor_run_id"], "donor", dag_id="xcom_trust_donor")
        set_row(run_id, "other_dag", donated, 1, dag_id="xcom_trust_mapped")  # another DAG's value in index 1

    @task
    def whole(values: object) -> list:  # a plain reducer: LazyXComSequence, fetched values
        return list(values)

    @task.ray
    def whole_in_ray(values: object) -> list:  # a @task.ray reducer: the same rows, as references
        return list(values)

    @task
    def pull_all(source: str, ti=None) -> list:  # ti.xcom_pull of a mapped task: get_all
        return list(ti.xcom_pull(task_ids=source))

    outputs = {name: item.override(task_id=name).expand(i=[0, 1, 2])
               for name in ("untouched", "copied_down", "copied_up", "foreign", "other_dag")}
    done = tamper()
    list(outputs.values()) >> done
    secret() >> done
    readers = [
        whole.override(task_id="whole_untouched")(outputs["untouched"]),
        whole_in_ray.override(task_id="whole_in_ray_untouched")(outputs["untouched"]),
        pull_all.override(task_id="pull_all_untouched")("untouched"),
        whole.override(task_id="whole_copied_down")(outputs["copied_down"]),
        whole_in_ray.override(task_id="whole_in_ray_copied_up")(outputs["copied_up"]),
        pull_all.override(task_id="pull_all_copied_up")("copied_up"),
        whole.override(task_id="whole_foreign")(outputs["foreign"]),
        whole_in_ray.override(task_id="whole_in_ray_foreign")(outputs["foreign"]),
        whole.override(task_id="whole_other_dag")(outputs["other_dag"]),
        whole_in_ray.override(task_id="whole_in_ray_other_dag")(outputs["other_dag"]),
    ]
    for reader in readers:
        done >> reader


xcom_trust_mapped_dag = xcom_trust_mapped()
