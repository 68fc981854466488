"""Analyse a trained classifier from a checkout, as the installed ``critnet`` command does:
``python analyze.py validate -c resnet20_cifar10 [-c rank_seed]`` (preset names, or paths to YAML files)."""

from critnet.cli import main

if __name__ == "__main__":
    main()
