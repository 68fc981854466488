"""Analyse a trained classifier: ``python analyze.py validate -c configs/resnet20_cifar10.yaml [-c configs/rank_seed.yaml]``."""

from critnet.cli import main

if __name__ == "__main__":
    main()
