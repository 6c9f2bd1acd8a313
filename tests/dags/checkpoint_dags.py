"""DAGs exercised by tests/integration/operators/test_checkpoint.py (checkpoint=True with the Ray XCom backend).

Each task that must not run twice appends a line to ``params.marker``, so the tests can
count how often its body really ran.
"""

from __future__ import annotations

import datetime

import pendulum
from airflow.sdk import dag, task

START = pendulum.datetime(2026, 1, 1, tz="UTC")
NO_DELAY = datetime.timedelta(0)


def _mark(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


@dag(dag_id="ckpt_reuse", schedule=None, start_date=START, params={"n": 5, "marker": ""})
def ckpt_reuse():
    """Rerun in the same DAG run: restored, not recomputed, unless inputs change or conf forces it."""

    @task.ray(checkpoint=True)
    def produce(n: str, marker: str) -> list:
        _mark(marker, f"produce {n}")
        return [i * i for i in range(int(n))]

    @task.ray
    def total(values: list) -> int:
        return sum(values)

    total(produce("{{ params.n }}", "{{ params.marker }}"))


@dag(dag_id="ckpt_progress", schedule=None, start_date=START, params={"epochs": 5, "fail_at": 2, "marker": ""})
def ckpt_progress():
    """Saves progress every epoch; the first try fails mid-way and the retry continues from the save."""

    @task.ray(checkpoint=True, retries=1, retry_delay=NO_DELAY)
    def train(params: dict, try_number: str) -> dict:
        from airflow_ray_provider.cluster.checkpoint import current

        ckpt = current()
        state = ckpt.load("progress", default={"epoch": 0, "done": []})
        for epoch in range(state["epoch"], params["epochs"]):
            _mark(params["marker"], f"epoch {epoch} try {try_number}")
            state = {"epoch": epoch + 1, "done": [*state["done"], epoch]}
            ckpt.save("progress", state)
            if epoch == params["fail_at"] and try_number == "1":
                raise RuntimeError(f"simulated failure after epoch {epoch}")
        return {"done": state["done"], "tries": int(try_number)}

    train(try_number="{{ ti.try_number }}")


@dag(dag_id="ckpt_killed_writer", schedule=None, start_date=START, params={"mb": 256, "marker": "", "pids": ""})
def ckpt_killed_writer():
    """The test kills the Ray worker while it uploads the checkpoint; the Airflow retry recomputes."""

    @task.ray(checkpoint=True, ray_max_retries=0, retries=1, retry_delay=NO_DELAY)
    def produce(params: dict) -> object:
        import os

        import numpy as np

        _mark(params["marker"], "produce")
        _mark(params["pids"], str(os.getpid()))
        return np.full(params["mb"] * 1024 * 1024 // 8, 7.0)

    @task.ray
    def check(arr: object) -> dict:
        return {"len": int(arr.size), "sum": float(arr.sum())}

    check(produce())


@dag(dag_id="ckpt_store_down", schedule=None, start_date=START, params={"marker": ""})
def ckpt_store_down():
    """The checkpoint store cannot be reached: the tasks must fail, not report success.

    ``produce`` fails before its body runs (looking for a checkpoint to reuse);
    ``produce_again`` skips that look, so its body runs and the write fails.
    """
    down = {"checkpoint": True, "checkpoint_path": "s3://airflow-ray-ckpt/down", "checkpoint_conn_id": "ckpt_s3_down"}

    @task.ray(**down)
    def produce(params: dict) -> list:
        _mark(params["marker"], "produce")
        return [1, 2, 3]

    @task.ray(**down, checkpoint_recompute=True)
    def produce_again(params: dict) -> list:
        _mark(params["marker"], "produce_again")
        return [1, 2, 3]

    produce()
    produce_again()


@dag(dag_id="ckpt_mapped", schedule=None, start_date=START, params={"marker": ""})
def ckpt_mapped():
    """A checkpointed list fanned out to checkpointed mapped Ray tasks: one checkpoint per item and instance."""

    @task.ray(checkpoint=True)
    def numbers(marker: str) -> list:
        _mark(marker, "numbers")
        return [3, 4, 5]

    @task.ray(checkpoint=True)
    def square(x: int, marker: str) -> int:
        _mark(marker, f"square {x}")
        return x * x

    @task
    def total(values: list) -> int:
        return sum(values)

    total(square.partial(marker="{{ params.marker }}").expand(x=numbers("{{ params.marker }}")))


for factory in (ckpt_reuse, ckpt_progress, ckpt_killed_writer, ckpt_store_down, ckpt_mapped):
    globals()[f"{factory.__name__}_dag"] = factory()
