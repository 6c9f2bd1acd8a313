"""DAGs exercised by tests/integration/operators/test_gateway.py: ``@task.ray`` on a connection that reaches the
cluster through its gateway (``gateway_url``), with the Ray XCom backend."""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag, task

START = pendulum.datetime(2026, 1, 1, tz="UTC")
CONN = "ray_gateway"


@dag(dag_id="gateway_flow", schedule=None, start_date=START)
def gateway_flow():
    """Ray to Ray by key (a dict split by multiple_outputs, a list split for mapping), Ray to a plain task by value."""

    @task.ray(ray_conn_id=CONN, multiple_outputs=True, num_cpus=0)
    def make(n: int) -> dict:
        print(f"gateway-make {n} rows", flush=True)
        return {"rows": [{"i": i, "sq": i * i} for i in range(n)], "scale": 3}

    @task.ray(ray_conn_id=CONN, num_cpus=0)
    def total(rows: list, scale: int) -> int:
        return sum(r["sq"] for r in rows) * scale

    @task.ray(ray_conn_id=CONN, num_cpus=0)
    def numbers() -> list:
        return [1, 2, 3]

    @task.ray(ray_conn_id=CONN, num_cpus=0)
    def square(x: int) -> int:
        return x * x

    @task.ray(ray_conn_id=CONN, num_cpus=0, deferrable=True, checkpoint=True)
    def later(x: int) -> int:
        return x + 1000  # waited for by the trigger (in line under dag.test()), its result checkpointed

    @task
    def plain(t: int, squares: list, deferred: int) -> dict:
        return {"total": t, "squares": sorted(squares), "deferred": deferred}

    made = make(100)
    plain(total(made["rows"], made["scale"]), square.expand(x=numbers()), later(7))


@dag(dag_id="gateway_failure", schedule=None, start_date=START)
def gateway_failure():
    @task.ray(ray_conn_id=CONN, num_cpus=0)
    def explode() -> None:
        print("gateway about to fail", flush=True)
        raise ValueError("the user's gateway message 7")

    @task.ray(ray_conn_id=CONN, num_cpus=0)
    def skip_me() -> None:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("nothing to do through the gateway")  # comes back as a skip, not a failure

    explode()
    skip_me()


@dag(dag_id="gateway_infeasible", schedule=None, start_date=START)
def gateway_infeasible():
    @task.ray(ray_conn_id=CONN, num_gpus=64)
    def too_big() -> None:
        return None

    too_big()


@dag(dag_id="gateway_restart", schedule=None, start_date=START, params={"folder": ""})
def gateway_restart():
    """One task that notes each run of its body in ``folder`` and ends once the test creates ``folder/go``."""

    @task.ray(ray_conn_id=CONN, num_cpus=0)
    def gated(params: dict) -> int:
        import os
        import time

        with open(os.path.join(params["folder"], "runs"), "a") as runs:
            runs.write("run\n")
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(params["folder"], "go")) and time.monotonic() < deadline:
            time.sleep(0.05)
        return 42

    gated()


# A package the stock-head test uploads (gcs://...), the task's own py_modules (tests/system/cluster/
# test_gateway_bootstrap.py): its worker must still get the provider's code, which that head has no copy of.
OWN_MODULE = os.environ.get("AIRFLOW_RAY_TEST_OWN_MODULE")


@dag(dag_id="gateway_own_modules", schedule=None, start_date=START)
def gateway_own_modules():
    @task.ray(ray_conn_id=CONN, num_cpus=0, runtime_env={"py_modules": [OWN_MODULE]})
    def use_own_module() -> int:
        import gwhelper

        return gwhelper.VALUE

    @task
    def plain(value: int) -> dict:
        return {"own_module": value}

    plain(use_own_module())


gateway_flow_dag = gateway_flow()
gateway_restart_dag = gateway_restart()
gateway_own_modules_dag = gateway_own_modules() if OWN_MODULE else None
gateway_failure_dag = gateway_failure()
gateway_infeasible_dag = gateway_infeasible()
