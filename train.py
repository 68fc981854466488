"""Train or fine-tune: ``python train.py -c configs/resnet20_cifar10.yaml -c configs/finetune_resnet20_jpeg.yaml``."""

from critnet.cli import train_main

if __name__ == "__main__":
    train_main()
