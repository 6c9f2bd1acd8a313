"""The provider's code a Ray job carries (``py_modules`` of its runtime environment), kept on every task.

A task inherits its job's runtime environment, but Ray merges a task's own ``runtime_env`` over it field by field:
a task that names its own ``py_modules`` would lose the job's, and with them the provider's cluster-side code its
worker runs in. ``with_shipped_code`` adds them back. Used by a Ray driver (``operators/ray.py``, through
``bundle``) and by the gateway for the calls it submits.
"""

from __future__ import annotations

from typing import Any

import ray


def shipped_uris() -> list[str]:
    """The ``gcs://`` URIs of the shipped code in the connected job (empty when nothing was shipped).

    A task's own ``py_modules`` replace the inherited ones (Ray merges runtime_env by field), so
    :func:`with_shipped_code` appends these to them.
    """
    env = ray.get_runtime_context().runtime_env or {}
    return [u for u in env.get("py_modules") or [] if isinstance(u, str) and u.startswith("gcs://")]


def with_shipped_code(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """``runtime_env`` for one task: when it names ``py_modules``, the shipped code is added to them."""
    if "py_modules" not in runtime_env:
        return runtime_env  # inherited from the job (through the owner actor)
    modules = list(runtime_env.get("py_modules") or [])
    return {**runtime_env, "py_modules": [*modules, *(u for u in shipped_uris() if u not in modules)]}
