"""The evaluation preprocessing a model's weights expect: resize, centre crop, interpolation, mean and std.

torchvision weights carry their own (``weights.transforms()``: ViT-B/16 SWAG wants 384 px bicubic, EfficientNet-B3
320 → 300 px, ...); timm models carry a pretrained config, transformers models an image processor. A model
evaluated with another preprocessing than its weights were trained with loses accuracy for no reason of its own.
"""

from __future__ import annotations

from critnet.models.checkpoints import torchvision_weights
from critnet.models.hf_models import hf_preprocessing
from critnet.models.registry import get_model_spec
from critnet.models.spec import INTERPOLATIONS, Preprocessing
from critnet.models.timm_models import pretrained_tag, split_name


def preprocessing(arch: str | None = None, weights: str | None = None) -> Preprocessing:
    """The eval preprocessing of ``arch`` with ``weights``: a torchvision weight name's own; for a file or random
    weights the architecture's default weights' (what a fine-tuned copy most likely kept); for timm models their
    pretrained config; for transformers models their image processor's (:func:`critnet.models.hf_models
    .hf_preprocessing`); otherwise resize 256, crop 224, bilinear, ImageNet mean/std.

    >>> preprocessing("efficientnet_b3").crop_size
    300
    """
    if arch is None:
        return Preprocessing(256, 224)
    spec = get_model_spec(arch)
    if spec.family == "imagenet":
        import torchvision.models as tvm

        chosen = torchvision_weights(arch, weights) or tvm.get_model_weights(arch).DEFAULT
        tf = chosen.transforms()
        return Preprocessing(tf.resize_size[0], tf.crop_size[0], tf.interpolation.value, tuple(tf.mean), tuple(tf.std))
    if spec.family == "timm":
        return _timm_preprocessing(arch, weights)
    if spec.family == "hf":
        return hf_preprocessing(arch)
    return Preprocessing(spec.input_size, spec.input_size)


def _timm_preprocessing(arch: str, weights: str | None) -> Preprocessing:
    import timm

    name = split_name(arch)
    tag = pretrained_tag(arch, weights) if weights else None
    try:
        cfg = timm.get_pretrained_cfg(f"{name}.{tag}" if tag else name)
    except Exception:  # noqa: BLE001 - a model without pretrained config: timm's usual ImageNet preprocessing
        cfg = None
    if cfg is None:
        return Preprocessing(256, 224)
    crop = int(cfg.input_size[-1])
    # timm's rarer modes ("random" for training) have no eval meaning here; its eval default is bicubic
    interpolation = cfg.interpolation if cfg.interpolation in INTERPOLATIONS else "bicubic"
    return Preprocessing(int(crop / cfg.crop_pct), crop, interpolation, tuple(cfg.mean), tuple(cfg.std))
