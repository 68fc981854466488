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


def sum_halves(losses: Tensor, top1: Tensor, top5: Tensor, offset: int,
               reference: tuple[Tensor, Tensor, Tensor] | None = None) -> list[tuple[Tally, Tally]]:
    """Per variant: the tallies of the samples of this batch in the first and in the second half of the set.

    ``reference`` holds the unperturbed model's ``(losses, top1, top5)`` for the same samples (``(batch,)``
    tensors); with it the tallies also carry the paired sums behind the standard errors (see :class:`Tally`).
    """
    first = in_first_half(offset, losses.shape[1], losses.device)
    second = ~first
    columns = [losses, top1.double(), top5.double()]
    if reference is not None:
        base_losses, base_top1, base_top5 = (r.to(losses.device) for r in reference)
        columns += [(losses - base_losses).square(), (top1 != base_top1).double(), (top5 != base_top5).double()]
    # Indexing, not multiplying by a 0/1 mask: an infinite loss times 0 would turn into NaN.
    sums = torch.stack([c[:, half].sum(1) for c in columns for half in (first, second)], dim=1).cpu().tolist()
    counts = (int(first.sum()), losses.shape[1] - int(first.sum()))
    pairs = []
    for s in sums:
        halves = []
        for h in (0, 1):
            paired = {} if reference is None else dict(delta_sq_sum=s[6 + h], top1_changed=int(s[8 + h]),
                                                       top5_changed=int(s[10 + h]), paired=counts[h])
            halves.append(Tally(s[h], int(s[2 + h]), int(s[4 + h]), counts[h], **paired))
        pairs.append((halves[0], halves[1]))
    return pairs


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
