"""critnet: which parameters and neurons of a trained image classifier are critical, how it holds up when pruned.

The public API is Lightning-free and works on any ``nn.Module`` classifier and any iterable of ``(inputs, targets)``
batches::

    import critnet
    model = critnet.load_model("resnet20", weights="resnet20-cifar10")
    ranking = critnet.rank(model, loader, unit="channel", perturbation="zero", score="delta_loss")
    sweep = critnet.prune_sweep(model, loader, method="connections", p_prune=[0.1, 0.2])
    comparison = critnet.compare_orders(model, loader, criticality=ranking, ratios=[0.05, 0.1])

The command line (``analyze.py``) and the Lightning callbacks call these same functions.
"""

# The engine is imported before the evaluation loop that it builds on (critnet.evaluation imports the engine's data
# module, whose package imports the engine's core, which imports the evaluation loop).
from critnet.engine import evaluate_units  # noqa: F401  (import order, see above)
from critnet.analysis.pruning import compare_orders, prune_sweep
from critnet.analysis.ranking import RankSettings, rank
from critnet.choices import SettingError
from critnet.distributed import Distributed
from critnet.engine.data import EvaluationSet
from critnet.errors import CritnetError
from critnet.evaluation import evaluate
from critnet.models import list_models, load_model
from critnet.perturb import Perturbation, Unit, select_units
from critnet.results import Ranking, Sweep

__version__ = "0.1.0"

__all__ = [
    "CritnetError",
    "Distributed",
    "EvaluationSet",
    "Perturbation",
    "RankSettings",
    "Ranking",
    "SettingError",
    "Sweep",
    "Unit",
    "compare_orders",
    "evaluate",
    "list_models",
    "load_model",
    "prune_sweep",
    "rank",
    "select_units",
]
