"""The order in which a tier's lanes (pytest-xdist workers, ``--dist loadfile``) are handed its modules.

A lane takes a module whole, so the tier ends when its longest lane does. Each tier's conftest names its order
(``LANE_ORDER``): the one ``benchmarks/lane_schedule.py`` found best by replaying pytest-xdist's scheduler on a
run's test times (a lane also takes its next module when two or fewer of its tests are left, so plain
longest-first is not the best). The Makefile passes ``--no-loadscope-reorder``, which keeps this order
(pytest-xdist's own orders modules by their number of tests, which says little about their time).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def module_in(item: pytest.Item, tier: Path) -> str | None:
    """``item``'s module as a path relative to ``tier`` (``"hooks/test_ray.py"``), or ``None`` outside it."""
    path = Path(str(item.path)).resolve()
    return path.relative_to(tier).as_posix() if tier in path.parents else None


def in_lane_order(items: list[pytest.Item], tier: Path, order: tuple[str, ...]) -> None:
    """Sort ``items`` in place: the modules of ``tier`` named in ``order`` (paths relative to ``tier``), in that
    order, then the tier's other modules and any item outside it, each in collection order."""
    def rank(item: pytest.Item) -> int:
        module = module_in(item, tier)
        return order.index(module) if module in order else len(order)

    position = {id(item): n for n, item in enumerate(sorted(items, key=rank))}  # stable: a module stays whole
    items.sort(key=lambda item: position[id(item)])
