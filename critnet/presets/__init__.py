"""The YAML presets of the command line, shipped inside the package.

A preset is a file ``<name>.yaml`` in this folder whose first comment line says what it is for. The command line
takes a preset's name wherever it takes a config file (``critnet validate -c resnet20_cifar10 -c rank_neurons``);
an existing file of that name always wins, so a preset can be copied, edited and passed by its path.
"""

from __future__ import annotations

from pathlib import Path

from critnet.errors import CritnetError

FOLDER = Path(__file__).resolve().parent
SUFFIX = ".yaml"


def names() -> list[str]:
    """The names of the presets, sorted.

    >>> [name for name in critnet.presets.names() if name.startswith("rank_")]
    ['rank_heads', 'rank_neurons', 'rank_seed']
    """
    return sorted(path.stem for path in FOLDER.glob("*" + SUFFIX))


def path(name: str) -> Path:
    """The file of the preset ``name``, given with or without its ``.yaml``.

    Raises :class:`critnet.CritnetError` listing the presets when there is none of that name.

    >>> critnet.presets.path("rank_neurons.yaml") == critnet.presets.path("rank_neurons")
    True
    >>> critnet.presets.path("rank_neurons").parent.name
    'presets'
    >>> critnet.presets.path("rank_neuron")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    critnet.errors.CritnetError: no preset named 'rank_neuron'; the presets are convnext_tiny_imagenet, ...
    """
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stem in names():
        return FOLDER / (stem + SUFFIX)
    raise CritnetError(f"no preset named {name!r}; the presets are {', '.join(names())}")


def summary(name: str) -> str:
    """The first comment line of the preset ``name``: what it is for.

    >>> critnet.presets.summary("resnet20_cifar10")
    'ResNet20 on CIFAR-10 (public checkpoint: --model.weights resnet20-cifar10 or a local .th file).'
    """
    for line in path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""
