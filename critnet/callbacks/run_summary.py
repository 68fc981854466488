"""Writes ``metrics.json`` and prints a summary table after every evaluation."""

from __future__ import annotations

import itertools
import time

import lightning as L
import torch

from critnet.distributed import all_gather_objects
from critnet.console import print_table
from critnet.writers import write_csv, write_json


class RunSummary(L.Callback):
    """After validate/test (and each validation during fit), write the metrics beside the TensorBoard events.

    ``metrics.json`` holds ``top1``/``top5`` (percent), ``loss`` (mean cross-entropy), ``samples`` (images
    counted, each exactly once across devices), the model, the checkpoint's sha256, the data root, and the image
    files of the evaluation split left out as unreadable (``skipped_images``, a count, and ``skipped_paths``; see
    ``--data.skip_unreadable``; ``fit`` prints the training split's count at the end). ``predict`` writes ``predictions.csv``: one row per image of the evaluation split,
    in dataset order; an unreadable image left out has no row (``sample`` stays the index in the split).

    Args:
        filename: Name of the JSON file written in the logger's ``log_dir``.
        print_summary: Print a rich table of the metrics at the end of ``validate``/``test`` (rank 0).
    """

    def __init__(self, filename: str = "metrics.json", print_summary: bool = True) -> None:
        self.filename = filename
        self.print_summary = print_summary
        self._started = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    on_test_start = on_validation_start

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "skipped_images"):
            return
        # metrics.json lists the validation split's; the training split's are only counted here
        train = datamodule.skipped_images("train", gather=True)  # a collective under DDP
        val = _skipped_images(trainer, gather=True)
        if (train or val) and trainer.is_global_zero:
            print(f"skipped {len(train)} unreadable training and {len(val)} validation image(s) "
                  "(--data.skip_unreadable)")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._predictions: list[dict[str, torch.Tensor]] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._predictions.append({k: v.detach().cpu() for k, v in outputs.items()})

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = {k: torch.cat([p[k] for p in self._predictions]) for k in ("target", "top5", "loss")} \
            if self._predictions else None
        datamodule = trainer.datamodule
        left_out_here = datamodule.skipped_indices() if hasattr(datamodule, "skipped_indices") else []
        shards = all_gather_objects((local, left_out_here, _skipped_images(trainer, gather=False)))
        log_dir = trainer.log_dir  # a collective under DDP
        if not trainer.is_global_zero:
            return
        rows = []
        world = len(shards)
        left_out = {i for _, indices, _ in shards for i in indices}
        skipped = sorted({path for _, _, paths in shards for path in paths})
        for rank, (shard, _, _) in enumerate(shards):
            if shard is None:
                continue
            # The unpadded sampler gives rank r the samples r, r + W, r + 2W, ...; those left out as unreadable
            # have no prediction.
            samples = (i for i in itertools.count(rank, world) if i not in left_out)
            for k, sample in zip(range(len(shard["target"])), samples):
                rows.append({"sample": sample, "target": int(shard["target"][k]),
                             "prediction": int(shard["top5"][k, 0]),
                             "top5": " ".join(str(int(c)) for c in shard["top5"][k]),
                             "loss": float(shard["loss"][k])})
        rows.sort(key=lambda r: r["sample"])
        path = write_csv(f"{log_dir}/predictions.csv", rows, ["sample", "target", "prediction", "top5", "loss"])
        print(f"predictions for {len(rows)} images written to {path}")
        if skipped:
            shown = ", ".join(skipped[:3]) + (", …" if len(skipped) > 3 else "")
            print(f"skipped {len(skipped)} unreadable image(s), not in predictions.csv: {shown}")

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        metrics = getattr(pl_module, "last_metrics", {}).get(stage)
        skipped = _skipped_images(trainer, gather=True)  # gathers under DDP: every rank must ask
        log_dir = trainer.log_dir  # broadcasts under DDP: every rank must ask
        if metrics is None or not trainer.is_global_zero:
            return
        weights = getattr(pl_module, "weights_info", None)
        datamodule = trainer.datamodule
        record = {
            "stage": stage,
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "loss": metrics["loss"],
            "samples": metrics["samples"],
            "top1_correct": metrics["top1_correct"],
            "top5_correct": metrics["top5_correct"],
            "model": getattr(pl_module, "arch", type(pl_module).__name__),
            "checkpoint": weights.path if weights else None,
            "checkpoint_sha256": weights.sha256 if weights else None,
            "data_root": str(getattr(datamodule, "root", "")) or None,
            "epoch": trainer.current_epoch,
            "devices": trainer.world_size,
            "elapsed_s": round(time.perf_counter() - self._started, 3),
            "torch": torch.__version__,
            "skipped_images": len(skipped),
            "skipped_paths": skipped,
        }
        path = write_json(f"{log_dir}/{self.filename}", record)
        if skipped and trainer.state.fn in ("validate", "test"):
            print(f"skipped {len(skipped)} unreadable image(s) (--data.skip_unreadable), listed in {path}")
        if self.print_summary and trainer.state.fn in ("validate", "test"):
            print_table(
                f"{record['model']} · {stage} · {trainer.world_size} device(s) · written to {log_dir}",
                ["top-1 %", "top-5 %", "loss", "samples", "checkpoint sha256"],
                [[record["top1"], record["top5"], record["loss"], record["samples"],
                  (record["checkpoint_sha256"] or "—")[:16]]],
                digits=4,
            )


def _skipped_images(trainer: L.Trainer, gather: bool) -> list[str]:
    """The evaluation split's images left out as unreadable, by this rank or (``gather``, a collective under DDP)
    by all ranks."""
    datamodule = trainer.datamodule
    if not hasattr(datamodule, "skipped_images"):
        return []
    return datamodule.skipped_images("eval", gather=gather)
