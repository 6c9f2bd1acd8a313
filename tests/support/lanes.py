"""The order in which a tier's lanes (pytest-xdist workers, ``--dist loadfile``) are handed its modules.

A lane takes a module whole, so the tier ends when its longest lane does: the longest modules go first and the
short ones fill in behind them. The Makefile passes ``--no-loadscope-reorder``, which keeps this order
(pytest-xdist's own orders modules by their number of tests, which says little about their time).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def longest_first(items: list[pytest.Item], tier: Path, longest: tuple[str, ...]) -> None:
    """Sort ``items`` in place: the modules of ``tier`` named in ``longest`` (slowest first, paths relative to
    ``tier``), then the tier's other modules and any item outside it, each in collection order."""
    def rank(item: pytest.Item) -> int:
        path = Path(str(item.path)).resolve()
        if tier not in path.parents:
            return len(longest)
        relative = path.relative_to(tier).as_posix()
        return longest.index(relative) if relative in longest else len(longest)

    order = {id(item): n for n, item in enumerate(sorted(items, key=rank))}  # stable: a module stays whole
    items.sort(key=lambda item: order[id(item)])
