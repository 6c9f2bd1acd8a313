"""Benchmark DAGs ``chain{1,10,20}_plain``: the chain with plain ``@task``."""

from __future__ import annotations

from _chain import LENGTHS, build_chain
from airflow.sdk import task

for _length in LENGTHS:
    build_chain(f"chain{_length}_plain", _length, task)
