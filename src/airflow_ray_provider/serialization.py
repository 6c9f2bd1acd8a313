"""Pickling what a task sends to Ray, with errors that name the task, argument and type.

Airflow imports DAG files under generated module names (``unusual_prefix_...``)
that a Ray worker cannot import, so the callable's own module and every helper
module loaded from the DAGs folder are pickled by value, not by reference.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from airflow_ray_provider.exceptions import RaySerializationError

_register_lock = threading.Lock()
_PORTABLE_SCALARS = (str, int, float, bool, type(None), dt.datetime, dt.date, dt.timedelta, dt.time)


def pickler() -> ModuleType:
    """The cloudpickle a task's call is pickled with: Ray's own copy in a process that is a Ray driver (every Ray
    node can load its pickles), the standalone package in one that reaches the cluster through the gateway and
    never imported Ray (the gateway's call payload needs it on the nodes anyway)."""
    ray_copy = sys.modules.get("ray.cloudpickle")
    if ray_copy is not None:
        return ray_copy
    import cloudpickle  # here, not at the top: which copy depends on whether this process has imported Ray

    return cloudpickle


def _dags_folder() -> str | None:
    try:
        from airflow.configuration import conf

        folder = conf.get("core", "dags_folder", fallback=None)
    except Exception:  # noqa: BLE001 - outside a configured Airflow there is no DAGs folder
        return None
    return os.path.realpath(folder) if folder else None


@functools.cache
def _realpath(path: str) -> str:
    return os.path.realpath(path)


def _real_file(path: str) -> str:
    """``realpath`` of a module file through its folder's (cached): a task process has ~2,500 modules in a
    few hundred folders, and resolving each file costs ~0.1 s on a task's critical path."""
    folder, name = os.path.split(path)
    return os.path.join(_realpath(folder), name)


@functools.lru_cache(maxsize=1)
def _install_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({_realpath(paths[k]) + os.sep for k in ("purelib", "platlib", "stdlib", "platstdlib")})


def _installed(path: str) -> bool:
    return _realpath(path).startswith(_install_roots())


def _by_value_modules(fn: Callable[..., Any]) -> list[ModuleType]:
    """Modules a Ray worker may not import: the callable's own (unless installed) and the DAGs folder's."""
    found: dict[str, ModuleType] = {}
    own = sys.modules.get(getattr(fn, "__module__", "") or "")
    own_file = getattr(own, "__file__", None)
    if own is not None and own.__name__ != "__main__" and (own_file is None or not _installed(own_file)):
        found[own.__name__] = own
    dags = _dags_folder()
    if dags:
        prefix = dags.rstrip(os.sep) + os.sep
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if path and name != "__main__" and _real_file(path).startswith(prefix):
                found[name] = module
    return list(found.values())


@contextmanager
def _pickled_by_value(cloudpickle: ModuleType, modules: list[ModuleType]) -> Iterator[None]:
    with _register_lock:
        registered = []
        for module in modules:
            try:
                cloudpickle.register_pickle_by_value(module)
                registered.append(module)
            except ValueError:
                continue  # a module cloudpickle cannot handle by value stays by reference
        try:
            yield
        finally:
            for module in registered:
                cloudpickle.unregister_pickle_by_value(module)


def dumps_callable(fn: Callable[..., Any], task_label: str) -> bytes:
    """The callable as bytes, with DAG-folder modules inlined."""
    cloudpickle = pickler()
    with _pickled_by_value(cloudpickle, _by_value_modules(fn)):
        try:
            return cloudpickle.dumps(fn)
        except Exception as exc:
            name = getattr(fn, "__qualname__", type(fn).__qualname__)
            raise RaySerializationError(
                f"Task {task_label}: the callable {name!r} cannot be pickled for Ray "
                f"(it captures something unpicklable): {exc}"
            ) from exc


def find_unpicklable(args: tuple[Any, ...], kwargs: Mapping[str, Any], task_label: str) -> RaySerializationError:
    """Name the first argument that cannot be pickled (called only after a failure)."""
    labelled = [(f"positional argument {i}", v) for i, v in enumerate(args)]
    labelled += [(f"argument {k!r}", v) for k, v in kwargs.items()]
    cloudpickle = pickler()
    for label, value in labelled:
        try:
            cloudpickle.dumps(value)
        except Exception as exc:  # noqa: BLE001 - reported below
            return RaySerializationError(
                f"Task {task_label}: {label} of type {_type_name(value)} cannot be pickled for Ray: {exc}"
            )
    return RaySerializationError(f"Task {task_label}: the arguments cannot be pickled for Ray")


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_portable(value: Any) -> bool:
    """True for context values that mean the same thing inside a Ray worker (dates, ids, params)."""
    if isinstance(value, _PORTABLE_SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_portable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_portable(v) for k, v in value.items())
    return False
