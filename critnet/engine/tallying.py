"""Per-sample loss and top-k hits of logits, summed (float64) into the tallies of the two halves of the samples.

The halves interleave: samples with an even index in the evaluation set form the first half, odd ones the second.
Datasets such as ImageFolder trees are sorted by class, so first-half/second-half splits would be class-disjoint and
their disagreement would measure class specificity rather than whether the evaluation set is large enough.
"""

from __future__ import annotations

import torch
from torch import Tensor

from critnet.scoring import Tally


def in_first_half(offset: int, batch: int, device: torch.device | str | None = None) -> Tensor:
    """Which samples of a batch starting at ``offset`` belong to the first (even-index) half of the set."""
    return (torch.arange(offset, offset + batch, device=device) % 2) == 0


def sum_halves(losses: Tensor, top1: Tensor, top5: Tensor, offset: int) -> list[tuple[Tally, Tally]]:
    """Per variant: the tallies of the samples of this batch in the first and in the second half of the set."""
    first = in_first_half(offset, losses.shape[1], losses.device)
    second = ~first
    # Indexing, not multiplying by a 0/1 mask: an infinite loss times 0 would turn into NaN.
    sums = torch.stack(
        [
            losses[:, first].sum(1),
            losses[:, second].sum(1),
            top1[:, first].sum(1).double(),
            top1[:, second].sum(1).double(),
            top5[:, first].sum(1).double(),
            top5[:, second].sum(1).double(),
        ],
        dim=1,
    ).cpu().tolist()
    n_first = int(first.sum())
    n_second = losses.shape[1] - n_first
    return [
        (Tally(s[0], int(s[2]), int(s[4]), n_first), Tally(s[1], int(s[3]), int(s[5]), n_second)) for s in sums
    ]


class TallyPair:
    """Running tallies of one variant over the two (even/odd) halves of the set."""

    __slots__ = ("first", "second")

    def __init__(self) -> None:
        self.first = Tally()
        self.second = Tally()

    def add(self, pair: tuple[Tally, Tally]) -> None:
        self.first = self.first + pair[0]
        self.second = self.second + pair[1]

    @property
    def halves(self) -> tuple[Tally, Tally]:
        return (self.first, self.second)

    @property
    def total(self) -> Tally:
        return self.first + self.second
