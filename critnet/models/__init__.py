"""Models by name. Importing this package registers every architecture."""

from critnet.models import cifar_resnet, torchvision_models  # noqa: F401  (registration side effect)
from critnet.models.loading import load_model, weights_info
from critnet.models.registry import (
    ModelSpec,
    build_model,
    get_model_spec,
    list_models,
    register_model,
)

__all__ = ["ModelSpec", "build_model", "get_model_spec", "list_models", "load_model", "register_model", "weights_info"]
