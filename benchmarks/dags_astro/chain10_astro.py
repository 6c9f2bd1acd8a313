"""``chain10_astro``: the chain benchmark's 10-task chain with astro-provider-ray 0.4.0's ``@ray.task``.

Parsed only by the astro-provider-ray virtualenv of ``benchmarks/astro_side_by_side.py`` (it and this provider
both claim connection type ``ray``, so they never share an Airflow). Each task is a Ray job submitted through
the head's job API; t1 returns 1 and each next task x + 1, as in ``benchmarks/dags/_chain.py``.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag
from ray_provider.decorators import ray

CONFIG = {"conn_id": "ray_astro", "num_cpus": 1, "poll_interval": 1, "fetch_logs": True}


@dag(dag_id="chain10_astro", schedule=None, start_date=dt.datetime(2025, 1, 1), catchup=False, tags=["benchmark"])
def chain10_astro() -> None:
    # astro writes each call as `name(<args>, <kwargs>)` into a script: a function without arguments
    # becomes `t1(, )`, a SyntaxError, so t1 takes one. Each body runs in a Ray job that sees only its own
    # source, and gets its upstream's XCom as the argument: it prints what it got.
    @ray.task(config=CONFIG)
    def t1(x):
        print(f"VALUE {x + 1}")
        return x + 1

    @ray.task(config=CONFIG)
    def step(x):
        print(f"VALUE {x + 1 if isinstance(x, int) else repr(x)}")
        return (x if isinstance(x, int) else 0) + 1

    value = t1(0)
    for i in range(2, 11):
        value = step.override(task_id=f"t{i}")(value)


chain10_astro()
