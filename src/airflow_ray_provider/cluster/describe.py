"""A short, human summary of a Python value (type, shape, columns, length, size estimate).

Computed inside Ray next to the value, so the Airflow UI can say what an XCom holds
without anyone pulling the object. This module runs inside the Ray cluster and must
not import Airflow.
"""

from __future__ import annotations

from typing import Any

_MAX_NAMES = 12
_MAX_REPR = 120
# The summary leads the XCom row, which stays small whatever the value (long column names, say).
MAX_SUMMARY = 200


def type_name(value: Any) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _names(names: Any) -> str:
    names = [str(n) for n in list(names)[: _MAX_NAMES + 1]]
    shown = ", ".join(names[:_MAX_NAMES])
    return f"[{shown}{', ...' if len(names) > _MAX_NAMES else ''}]"


def describe(value: Any) -> dict[str, Any]:
    """``{"type", "summary", "size_estimate", "length"}`` for ``value``; never raises."""
    try:
        described = _describe(value)
    except Exception as exc:  # noqa: BLE001 - a summary must never fail the task
        described = {"type": type_name(value), "summary": f"(no summary: {exc})", "size_estimate": None,
                     "length": None}
    summary = described["summary"]
    if len(summary) > MAX_SUMMARY:
        described["summary"] = summary[: MAX_SUMMARY - 3] + "..."
    return described


def _describe(value: Any) -> dict[str, Any]:
    kind = type(value).__name__
    module = type(value).__module__.split(".")[0]
    size: int | None = None
    length: int | None = None
    if module == "numpy" and hasattr(value, "shape") and hasattr(value, "nbytes"):
        size = int(value.nbytes)
        summary = f"{kind} shape={tuple(value.shape)} dtype={value.dtype}"
    elif module == "pandas" and kind == "DataFrame":
        length = len(value)
        size = int(value.memory_usage(index=True, deep=False).sum())
        summary = f"DataFrame {length} rows x {value.shape[1]} columns {_names(value.columns)}"
    elif module == "pandas" and kind == "Series":
        length = len(value)
        size = int(value.memory_usage(index=True, deep=False))
        summary = f"Series {length} rows dtype={value.dtype} name={value.name!r}"
    elif module == "pyarrow" and kind in ("Table", "RecordBatch"):
        length = value.num_rows
        size = int(value.nbytes)
        summary = f"{kind} {length} rows x {value.num_columns} columns {_names(value.column_names)}"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        length = size = len(value)
        summary = f"{kind} of {length} bytes"
    elif isinstance(value, str):
        length, size = len(value), len(value.encode("utf-8", "replace"))
        summary = repr(value) if length <= _MAX_REPR else f"str of {length} characters"
    elif isinstance(value, (bool, int, float, complex)) or value is None:
        summary = repr(value)[:_MAX_REPR]
    elif isinstance(value, dict):
        length = len(value)
        summary = f"dict of {length} keys {_names(value.keys())}"
    elif isinstance(value, (list, tuple, set, frozenset)):
        length = len(value)
        inner = {type_name(v) for v in list(value)[:100]} if not isinstance(value, (set, frozenset)) else set()
        of = f" of {', '.join(sorted(inner))}" if 0 < len(inner) <= 3 else ""
        summary = f"{kind} of {length} items{of}"
    else:
        try:
            length = len(value)
        except Exception:  # noqa: BLE001 - most objects have no length
            length = None
        summary = kind if length is None else f"{kind} of length {length}"
    return {"type": type_name(value), "summary": summary, "size_estimate": size, "length": length}
