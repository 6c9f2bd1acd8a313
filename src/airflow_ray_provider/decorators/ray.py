"""``@task.ray``: the TaskFlow decorator over :class:`~airflow_ray_provider.operators.ray.RayPythonOperator`.

Thin, as the standard provider's ``@task`` is over ``PythonOperator``: everything Ray does
lives in the operator, which also works on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory

from airflow_ray_provider.operators.ray import RayPythonOperator

if TYPE_CHECKING:
    from airflow.sdk.bases.decorator import TaskDecorator


class RayDecoratedOperator(DecoratedOperator, RayPythonOperator):
    """What ``@task.ray`` creates; takes every option of :class:`RayPythonOperator`."""

    template_fields: Sequence[str] = RayPythonOperator.template_fields
    template_fields_renderers = RayPythonOperator.template_fields_renderers
    custom_operator_name = "@task.ray"

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Sequence[Any] | None = None,
                 op_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(
            kwargs_to_upstream={"python_callable": python_callable, "op_args": op_args, "op_kwargs": op_kwargs},
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )


def ray_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """Wrap a function into an Airflow task that runs on Ray; registered as ``@task.ray``.

    Accepts the Ray options of :class:`RayPythonOperator` and every operator argument.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=RayDecoratedOperator,
        **kwargs,
    )
