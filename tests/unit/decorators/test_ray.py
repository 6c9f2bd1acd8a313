"""``@task.ray`` options are checked when the DAG is parsed, not when it runs."""

from __future__ import annotations

import pytest
from airflow.sdk import dag, task


def test_bad_options_are_rejected_when_the_dag_is_parsed() -> None:
    with pytest.raises(ValueError, match="num_cpus must be a non-negative number"):

        @dag(dag_id="bad_options", schedule=None)
        def bad():
            @task.ray(num_cpus=-1)
            def f() -> int:
                return 1

            f()

        bad()


@pytest.mark.parametrize("kind", ["generator", "async generator"])
def test_a_generator_function_is_refused_when_the_dag_is_parsed(kind: str) -> None:
    """Ray keeps one value of a generator: the rest of the items would be lost without a word."""
    def numbers():
        yield from (1, 2)

    async def anumbers():
        yield 1

    with pytest.raises(TypeError, match=r"@task.ray 'numbers': .* is a generator function; .* Return the items "
                                        r"as a list"):

        @dag(dag_id="generator_task", schedule=None)
        def generator_task():
            task.ray(numbers if kind == "generator" else anumbers, task_id="numbers")()

        generator_task()
