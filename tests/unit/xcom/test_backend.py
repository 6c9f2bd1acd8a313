"""Where a value read without its row may sit in a mapped task's output (``check_place``), no Ray needed.

The same refusals through real Airflow reads (LazyXComSequence, ``get_all``) are in tests/integration/test_trust.py.
"""

from __future__ import annotations

import pytest

from airflow_ray_provider.exceptions import RayXComReferenceError
from airflow_ray_provider.xcom.backend import SequencePlace, check_place
from airflow_ray_provider.xcom.reference import Location, Origin, RayObject


def _ref(map_index: int) -> RayObject:
    return RayObject(key=f"d/r/t/{map_index}/1/ab", location=Location("ray_default", "airflow", 0), type="int",
                     size=3, summary="1", origin=Origin("d", "t", "r", map_index))


def _read_whole(map_indexes: list[int], offsets: list[int | None] | None = None) -> None:
    seen: dict[int, int] = {}
    for offset, index in zip(offsets or range(len(map_indexes)), map_indexes, strict=True):
        check_place(_ref(index), SequencePlace(None, offset, seen))


def test_a_genuine_output_reads_whole_dense_sparse_or_again() -> None:
    _read_whole([0, 1, 2])
    _read_whole([0, 3, 7])  # map indexes without a row (a skipped instance) leave gaps
    _read_whole([0, 1, 0, 1], offsets=[0, 1, 0, 1])  # read twice through the same sequence
    _read_whole([2, 0], offsets=[None, 0])  # a negative index: its offset is unknown, nothing to compare


def test_a_row_copied_down_is_refused_by_its_offset() -> None:
    with pytest.raises(RayXComReferenceError, match=r"read as item 1 of the mapped output of dag 'd', task 't'.* "
                                                    r"written for map index 0"):
        _read_whole([0, 0, 2])


def test_a_row_copied_up_is_refused_when_read_again() -> None:
    with pytest.raises(RayXComReferenceError, match=r"map index 2 of dag 'd'.* was read twice from one mapped "
                                                    r"output \(items 0 and 2\)"):
        _read_whole([2, 1, 2])
