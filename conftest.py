"""Setup of the docstring examples of the ``critnet`` package, which pytest runs with ``--doctest-modules``.

Nothing here is imported at startup beyond pytest: tests/conftest.py imports Lightning before anything imports
rich (see critnet/__init__.py), and the doctest collection imports every critnet module after it.
"""

from __future__ import annotations

import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(scope="session", autouse=True)
def doctest_imports(doctest_namespace):
    """The names nearly every example uses, so that examples in modules that do not import them stay short."""
    import torch
    from torch import nn

    import critnet

    doctest_namespace.update(critnet=critnet, torch=torch, nn=nn)


@pytest.fixture(autouse=True)
def doctest_environment(request):
    """For each example: one intra-op thread (as tests/conftest.py gives every test, for the same reason: competing
    thread pools on the 2-core CI machine), a fixed seed (which tests ran before it in an xdist worker varies from run
    to run, so the global generator's state would too), and the model registry as it was (an example registers a
    model; the tests that run after it in the same worker must not see it)."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    import torch

    from critnet.models import registry

    threads = torch.get_num_threads()
    models = dict(registry._REGISTRY)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
    registry._REGISTRY.clear()
    registry._REGISTRY.update(models)
