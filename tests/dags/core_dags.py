"""DAGs exercised by tests/integration/decorators/test_ray.py (``dag.test()`` needs them in the DAGs folder)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

from airflow_ray_provider.decorators.ray import ray_task

START = pendulum.datetime(2026, 1, 1, tz="UTC")
SCALE = 10


def module_helper(x: int) -> int:
    return x * SCALE


@dataclasses.dataclass
class Stats:
    count: int
    total: int


@dag(dag_id="flow_both_ways", schedule=None, start_date=START)
def flow_both_ways():
    offset = 7  # captured by closure

    @task.ray(num_cpus=1)
    def produce(n: int) -> list[int]:
        import math  # imported inside the function, on the Ray worker

        return [module_helper(i) + offset + math.floor(0.5) for i in range(n)]

    @task
    def plain_sum(values: list[int]) -> int:
        return sum(values)

    @ray_task(ray_conn_id="ray_default")  # the seed articles' spelling of @task.ray
    def summarize(total: int, values: list[int]) -> dict:
        stats = Stats(count=len(values), total=total)
        return dataclasses.asdict(stats)

    values = produce(4)
    summarize(plain_sum(values), values)


@dag(dag_id="mapping_outputs", schedule=None, start_date=START, params={"factor": 3})
def mapping_outputs():
    @task
    def numbers() -> list[int]:
        return [1, 2, 3]

    @task.ray
    def scale(x: int, factor: int) -> int:
        return x * factor

    @task.ray(multiple_outputs=True)
    def split(values: list[int], run_id: str, stamp: str, params: dict) -> dict:
        return {"low": min(values), "high": max(values), "run_id": run_id, "stamp": stamp,
                "factor": params["factor"]}

    @task.ray
    def where(tag: str) -> str:
        return f"{tag}:{os.environ.get('AIRFLOW_RAY_TEST_TAG')}"

    scaled = scale.partial(factor=10).expand(x=numbers())
    split(scaled, stamp="{{ ds }}|{{ params.factor }}")
    where.override(task_id="where_env", runtime_env={"env_vars": {"AIRFLOW_RAY_TEST_TAG": "rt"}})(tag="t")


@dag(dag_id="remote_failure", schedule=None, start_date=START)
def remote_failure():
    @task.ray
    def explode() -> None:
        print("about to fail: marker-out")

        def deep_user_frame():
            raise ValueError("the user's own message 42")

        deep_user_frame()

    explode()


@dag(dag_id="native_output", schedule=None, start_date=START)
def native_output():
    """Output that never passes through ``sys.stdout``: descriptor writes, C's printf, child processes."""

    @task.ray
    def noisy(tag: str) -> int:
        import ctypes
        import os
        import subprocess
        import sys

        print(f"python-print {tag}")
        os.write(1, f"fd1-write {tag}\n".encode())
        os.write(2, f"fd2-write {tag}\n".encode())
        ctypes.CDLL(None).printf(f"c-printf {tag}\n".encode())  # buffered by C stdio until flushed
        subprocess.run(["echo", f"child-echo {tag}"], check=True)
        subprocess.run(["sh", "-c", f"echo child-stderr {tag} >&2"], check=True)
        for n in range(300):  # many lines from two descriptors at once: none may be cut or mixed
            os.write(1 + n % 2, f"burst {tag} {n:03d} {'x' * 200}\n".encode())
        sys.stdout.write(f"no-newline {tag}")
        return 1

    noisy.expand(tag=["alpha", "beta"])


@dag(dag_id="remote_skip", schedule=None, start_date=START)
def remote_skip():
    @task.ray
    def maybe() -> None:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("nothing to do today")

    maybe()


@dag(dag_id="timeout_cancels", schedule=None, start_date=START, params={"beat": "", "pid": ""})
def timeout_cancels():
    @task.ray(execution_timeout=pendulum.duration(seconds=4))
    def forever(beat_path: str, pid_path: str) -> None:
        Path(pid_path).write_text(str(os.getpid()))
        while True:
            Path(beat_path).write_text(str(time.time()))
            time.sleep(0.1)

    forever("{{ params.beat }}", "{{ params.pid }}")


@dag(dag_id="sigterm_cancels", schedule=None, start_date=START, params={"beat": ""})
def sigterm_cancels():
    @task.ray
    def forever(beat_path: str) -> None:
        while True:
            Path(beat_path).write_text(str(time.time()))
            time.sleep(0.1)

    forever("{{ params.beat }}")


_LOCK = threading.Lock()


@dag(dag_id="bad_callable", schedule=None, start_date=START)
def bad_callable():
    lock = _LOCK

    @task.ray
    def uses_lock() -> int:
        with lock:
            return 1

    uses_lock()


@dag(dag_id="bad_return", schedule=None, start_date=START)
def bad_return():
    @task.ray
    def returns_lock():
        import threading as th

        return th.Lock()

    @task.ray
    def returns_generator():
        return (i for i in range(3))  # a generator object from a plain function: found when it returns

    returns_lock()
    returns_generator()


@dag(dag_id="no_gpu", schedule=None, start_date=START)
def no_gpu():
    @task.ray(num_gpus=1)
    def train() -> int:
        return 1

    @task.ray(resources={"tpu_pod": 2})
    def custom() -> int:
        return 1

    train()
    custom()


@dag(dag_id="context_refused", schedule=None, start_date=START)
def context_refused():
    @task.ray
    def wants_ti(ti=None) -> int:
        return 1

    @task.ray
    def takes_kwargs(**context) -> list[str]:
        return sorted(k for k in ("ds", "run_id", "ti", "dag_run") if k in context)

    wants_ti()
    takes_kwargs()


@dag(dag_id="unreachable", schedule=None, start_date=START)
def unreachable():
    @task.ray(ray_conn_id="ray_dead")
    def never() -> int:
        return 1

    never()


@dag(dag_id="runtime_env_slow", schedule=None, start_date=START, params={"index_url": ""})
def runtime_env_slow():
    """A pip runtime_env whose index (the test's) answers when the test lets it, and never has the package."""

    @task.ray(runtime_env={"pip": {"packages": ["airflow-ray-no-such-package"],
                                   "pip_install_options": ["--index-url", "{{ params.index_url }}"]}})
    def never_installed() -> int:
        return 1

    never_installed()


flow_both_ways_dag = flow_both_ways()
mapping_outputs_dag = mapping_outputs()
remote_failure_dag = remote_failure()
remote_skip_dag = remote_skip()
native_output_dag = native_output()
timeout_cancels_dag = timeout_cancels()
sigterm_cancels_dag = sigterm_cancels()
bad_callable_dag = bad_callable()
bad_return_dag = bad_return()
no_gpu_dag = no_gpu()
context_refused_dag = context_refused()
unreachable_dag = unreachable()
runtime_env_slow_dag = runtime_env_slow()
