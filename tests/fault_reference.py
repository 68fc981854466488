"""The outcome counts of the fault tests' independent references: golden and faulty logits compared image by image,
bit for bit after widening to float32, with nothing from critnet."""

from __future__ import annotations

import torch

OUTCOMES = ("images", "masked", "noncritical", "sdc1", "sdc5", "nonfinite")


def outcomes(golden: list[torch.Tensor], faulty: list[torch.Tensor]) -> dict[str, int]:
    """Per-image outcomes of faulty logits against the golden ones (batches of float32 logits, in order)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for g, f in zip(golden, faulty):
        for gr, fr in zip(g, f):
            counts["images"] += 1
            if torch.equal(gr.view(torch.int32), fr.view(torch.int32)):
                counts["masked"] += 1
                continue
            broken = not bool(torch.isfinite(fr).all())
            counts["nonfinite"] += broken
            if broken or int(fr.argmax()) != int(gr.argmax()):
                counts["sdc1"] += 1
                counts["sdc5"] += broken or int(gr.argmax()) not in fr.topk(min(5, len(fr))).indices.tolist()
            else:
                counts["noncritical"] += 1
    return counts
