"""Basics: numpy and pandas work on Ray, a `.expand()` fan-out over Ray tasks, plain tasks mixed in.

Drop this file into your DAGs folder. With no ``ray_default`` connection the
provider starts an embedded Ray head once and reuses it for every task.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"shards": Param(4, type="integer", minimum=1), "rows_per_shard": Param(50_000, type="integer")},
    tags=["ray", "example"],
    render_template_as_native_obj=True,
)
def example_ray_basics():
    @task
    def plan(shards: int) -> list[int]:
        """A plain Airflow task decides the fan-out."""
        return list(range(shards))

    @task.ray(num_cpus=1)
    def simulate(shard: int, rows: int) -> dict:
        """Each shard runs as its own Ray task: numpy builds data, pandas summarises it."""
        import numpy as np
        import pandas as pd

        rng = np.random.default_rng(shard)
        frame = pd.DataFrame({"x": rng.normal(size=rows), "y": rng.integers(0, 10, size=rows)})
        print(f"shard {shard}: {len(frame)} rows")
        return {"shard": shard, "rows": len(frame), "y_sum": int(frame["y"].sum()),
                "x_mean": float(frame["x"].mean())}

    @task.ray(multiple_outputs=True)
    def combine(parts: list[dict]) -> dict:
        import pandas as pd

        table = pd.DataFrame(parts)
        return {"rows": int(table["rows"].sum()), "y_sum": int(table["y_sum"].sum()),
                "shards": len(table)}

    @task
    def report(rows: int, y_sum: int, shards: int) -> str:
        line = f"{shards} Ray shards produced {rows} rows; sum(y) = {y_sum}"
        print(line)
        return line

    totals = combine(simulate.partial(rows="{{ params.rows_per_shard }}").expand(shard=plan("{{ params.shards }}")))
    report(totals["rows"], totals["y_sum"], totals["shards"])


example_ray_basics()
