"""The evaluation methods of the engine, one module each (see :class:`~critnet.engine.unit_run.EvaluationMethod`).

Every module here defines ``METHOD``, one instance of its method; :data:`REGISTRY` finds them all, so a new
method is one new module (and its name in :data:`critnet.choices.METHODS`).
"""

from __future__ import annotations

import importlib
import pkgutil

from critnet.engine.unit_run import EvaluationMethod


def _discover() -> dict[str, EvaluationMethod]:
    methods = (importlib.import_module(f"{__name__}.{module.name}").METHOD for module in pkgutil.iter_modules(__path__))
    return {method.name: method for method in methods}


#: Every evaluation method by its name.
REGISTRY: dict[str, EvaluationMethod] = _discover()
