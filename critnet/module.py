"""The LightningModule: a registered model, cross-entropy, and exact top-1/top-5."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from critnet.errors import CritnetError
from critnet.models import get_model_spec, load_model, weights_info
from critnet.models.checkpoints import WeightsInfo, load_weights
from critnet.outputs import logits_of

EVAL_STAGES = ("val", "test")
DEFAULT_ARCH = "resnet20"


def _output_features(network: nn.Module) -> int:
    """The class count of a user's network: the output features of its last Linear layer."""
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CritnetError(
            f"--model.num_classes: cannot tell how many classes {type(network).__name__} outputs (no Linear layer); "
            "set it"
        )
    return linears[-1].out_features


class LossSum(Metric):
    """Mean of per-sample losses, summed in float64 on every rank and reduced by summing.

    torchmetrics' MeanMetric casts each update to the metric's dtype, which Lightning resets to float32 when it
    moves the module; per-batch float32 sums then drift by ~1e-8 over 10,000 images and differ between one and
    several devices. Here the sum is float64 whatever the module's dtype.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor) -> None:
        self.total += losses.detach().double().sum()
        self.count += losses.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class SampleCount(Metric):
    """Images counted (int64), summed over ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, targets: torch.Tensor) -> None:
        self.count += targets.numel()

    def compute(self) -> torch.Tensor:
        return self.count


def _eval_metrics(num_classes: int) -> MetricCollection:
    # micro = fraction of samples; torchmetrics' default (macro) would average per-class recalls instead.
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            "loss": LossSum(),
            "samples": SampleCount(),
        }
    )


class ClassifierModule(L.LightningModule):
    """An image classifier from critnet's model registry (or any ``nn.Module``), evaluated with exact top-1/top-5.

    Args:
        arch: Model name: any torchvision classifier (``mobilenet_v2``, ``vit_b_16``, ...), a CIFAR ResNet
            (``resnet20/32/44/56/110``) or ``timm/<name>`` with timm installed; ``python analyze.py --list-models``
            lists them all.
        weights: Checkpoint to start from: a file (``.th``/``.pth`` state dict, Lightning ``.ckpt``), a known name
            (``resnet20-cifar10`` ..., the arch's torchvision weight names such as ``DEFAULT`` or
            ``IMAGENET1K_V2``, a timm pretrained tag or ``pretrained``). ``None`` = random init.
        num_classes: Output classes; linked from the datamodule when run through the CLI.
        lr: Initial learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: L2 penalty applied by SGD.
        nesterov: Use Nesterov momentum.
        schedule: Learning-rate schedule over ``trainer.max_epochs``: ``cosine`` annealing, ``multistep`` (decay by
            ``gamma`` at ``milestones``) or ``constant``.
        milestones: Epochs at which ``multistep`` decays the learning rate.
        gamma: Decay factor of ``multistep``.
        warmup_epochs: Epochs of linear warm-up before the schedule starts.
        label_smoothing: Label smoothing of the training loss (evaluation always uses plain cross-entropy).
        network: Your own architecture instead of a named one: any ``nn.Module`` subclass given by ``class_path``
            and ``init_args``; ``weights`` may then be a state-dict file. Leave ``arch`` at its default with it.
    """

    def __init__(
        self,
        arch: str = DEFAULT_ARCH,
        weights: str | None = None,
        num_classes: int | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        schedule: Literal["cosine", "multistep", "constant"] = "cosine",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        label_smoothing: float = 0.0,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # The network's own modules are saved in the state dict; pickling it into the hyper-parameters would not be.
        self.save_hyperparameters(ignore=["network"])
        if network is not None:
            if arch != DEFAULT_ARCH:
                raise CritnetError(f"--model.network and --model.arch {arch!r}: give one of them, not both")
            self.arch = type(network).__name__
            self.num_classes = num_classes or _output_features(network)
            self.model: nn.Module = network
            self.weights_info: WeightsInfo | None = (
                load_weights(network, weights, self.arch) if weights is not None else None)
        else:
            spec = get_model_spec(arch)
            self.arch = arch
            self.num_classes = num_classes or spec.default_num_classes
            # a fresh LightningModule is in train mode, like any nn.Module (Lightning 2.x no longer switches it
            # for fit)
            self.model = load_model(arch, weights, self.num_classes).train()
            self.weights_info = weights_info(self.model)
        self.eval_metrics = nn.ModuleDict({stage: _eval_metrics(self.num_classes) for stage in EVAL_STAGES})
        #: The last computed evaluation metrics per stage (percent for accuracy), for reports.
        self.last_metrics: dict[str, dict[str, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the logits, also of a model that returns them in a ModelOutput (transformers' classifiers)
        return logits_of(self.model(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        top1 = (logits.argmax(1) == y).float().mean() * 100
        self.log_dict({"train/loss": loss, "train/top1": top1}, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x).float()
        losses = F.cross_entropy(logits, y, reduction="none")
        metrics = self.eval_metrics[stage]
        metrics["top1"].update(logits, y)
        metrics["top5"].update(logits, y)
        metrics["loss"].update(losses)
        metrics["samples"].update(y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x).float()
        return {"target": y, "top5": logits.topk(min(5, logits.shape[1]), dim=1).indices,
                "loss": F.cross_entropy(logits, y, reduction="none")}

    def _finish_eval_epoch(self, stage: str) -> None:
        # compute() all-reduces the metric states: every rank must get here, and all get the same numbers.
        computed = {name: float(v) for name, v in self.eval_metrics[stage].compute().items()}
        self.eval_metrics[stage].reset()
        samples = int(computed["samples"])
        values: dict[str, float] = {"loss": computed["loss"], "samples": samples}
        for k in ("top1", "top5"):
            # torchmetrics returns a float32 fraction; the correct count behind it is exact, so report
            # percent from the count (float32 error × 1e6 samples stays far below half a sample).
            correct = round(computed[k] * samples)
            values[f"{k}_correct"] = correct
            values[k] = 100.0 * correct / samples if samples else float("nan")
        self.last_metrics[stage] = values
        if not self.trainer.sanity_checking:
            # Already reduced over ranks by compute(); sync_dist only averages identical values (and keeps
            # Lightning from warning about epoch-level logging under DDP).
            self.log_dict({f"{stage}/{k}": float(values[k]) for k in ("top1", "top5", "loss", "samples")},
                          sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval_epoch("test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            # Weight decay on BatchNorm scales and biases hurts fine-tuning and is not what the checkpoints used.
            (no_decay if param.ndim <= 1 else decay).append(param)
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
        )
        epochs = max(1, self.trainer.max_epochs or 1)
        if hp.schedule == "cosine":
            main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - hp.warmup_epochs))
        elif hp.schedule == "multistep":
            main = torch.optim.lr_scheduler.MultiStepLR(optimizer, hp.milestones or [], gamma=hp.gamma)
        else:
            main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        if hp.warmup_epochs > 0:
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=hp.warmup_epochs)
            main = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[hp.warmup_epochs])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": main, "interval": "epoch"}}
