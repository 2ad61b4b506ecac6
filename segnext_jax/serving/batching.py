"""Images grouped by size for the network: one helper for prediction and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")


def batches_by_size(items: Iterable[Item], batch_size: int, size: Callable[[Item], Hashable]) -> Iterator[list[Item]]:
    """Groups of up to `batch_size` items of one `size` (an image's shape), so each group stacks into one network
    input. A group goes as soon as it is full; when more than 2 * batch_size items wait, the oldest group goes as it
    is, so memory stays bounded whatever the mix of sizes; the rest go at the end. Items may so leave out of order:
    callers key anything order-dependent (NMF seeds, samples) by the item's index, never by its batch."""
    pending: dict[Hashable, list[Item]] = {}
    for item in items:
        key = size(item)
        group = pending.setdefault(key, [])
        group.append(item)
        if len(group) == batch_size:
            yield pending.pop(key)
        elif sum(len(g) for g in pending.values()) > 2 * batch_size:
            yield pending.pop(next(iter(pending)))
    yield from pending.values()
