"""Train or fine-tune from a checkout, as the installed ``critnet-train`` command does:
``python train.py -c resnet20_cifar10 -c finetune_resnet20_jpeg`` (preset names, or paths to YAML files)."""

from critnet.cli import train_main

if __name__ == "__main__":
    train_main()
