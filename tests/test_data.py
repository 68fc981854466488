import pytest
from PIL import Image

from critnet.data import (
    CIFAR10DataModule,
    DataError,
    ImageNetDataModule,
    ImageReadError,
)
from critnet.distributed import UnpaddedDistributedSampler


def make_image_folder(root, split, classes, per_class, size=(32, 32)):
    for c in range(classes):
        d = root / split / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color = (c * 20 % 256, i * 30 % 256, 128)
            Image.new("RGB", size, color).save(d / f"{i:04d}.jpg")
    return root


def test_cifar_folder_layout_and_subsets(tmp_path):
    make_image_folder(tmp_path, "test", 10, 3)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=4, num_workers=0)
    dm.setup("validate")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 0, 1]
    first = CIFAR10DataModule(str(tmp_path), subset_size=5, num_workers=0)
    first.setup("validate")
    assert first.eval_dataset.indices == [0, 1, 2, 3, 4]
    drawn = [CIFAR10DataModule(str(tmp_path), subset_size=5, subset_seed=7, num_workers=0) for _ in range(2)]
    for dm in drawn:
        dm.setup("validate")
    assert drawn[0].eval_dataset.indices == drawn[1].eval_dataset.indices != [0, 1, 2, 3, 4]
    assert drawn[0].eval_dataset.indices == sorted(drawn[0].eval_dataset.indices)


def test_bad_roots_name_the_path(tmp_path):
    with pytest.raises(DataError, match="--data.root: .*missing does not exist"):
        CIFAR10DataModule(str(tmp_path / "missing")).setup("validate")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="neither cifar-10-batches-py .* nor an ImageFolder"):
        CIFAR10DataModule(str(tmp_path / "flat")).setup("validate")
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match="empty.test has no class folders"):
        CIFAR10DataModule(str(tmp_path / "empty")).setup("validate")
    make_image_folder(tmp_path / "three", "test", 3, 1)
    with pytest.raises(DataError, match="has 3 class folders, expected 10"):
        CIFAR10DataModule(str(tmp_path / "three")).setup("validate")
    make_image_folder(tmp_path / "ok", "test", 10, 1)
    with pytest.raises(DataError, match=r"--data.subset_size must be in \[1, 10\]"):
        CIFAR10DataModule(str(tmp_path / "ok"), subset_size=11).setup("validate")


def test_unreadable_image_names_the_file(tmp_path):
    make_image_folder(tmp_path, "test", 10, 1)
    bad = tmp_path / "test" / "class03" / "0000.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    dm = CIFAR10DataModule(str(tmp_path), batch_size=16, num_workers=0)
    dm.setup("validate")
    with pytest.raises(ImageReadError, match=f"cannot read image {bad}"):
        next(iter(dm.val_dataloader()))


def test_imagenet_standard_evaluation_transform(tmp_path):
    make_image_folder(tmp_path, "val", 3, 2, size=(300, 260))
    dm = ImageNetDataModule(str(tmp_path), batch_size=6, num_workers=0, num_classes=3)
    dm.setup("validate")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 3, 224, 224) and y.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DataError, match="has 3 class folders, expected 1000"):
        ImageNetDataModule(str(tmp_path)).setup("validate")


@pytest.mark.parametrize("total, world", [(10, 3), (7, 2), (1, 2), (8, 4)])
def test_unpadded_sampler_counts_every_sample_once(total, world):
    dataset = list(range(total))
    shards = [list(UnpaddedDistributedSampler(dataset, world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == dataset
    assert [len(UnpaddedDistributedSampler(dataset, world, r)) for r in range(world)] == [len(s) for s in shards]
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_corrupt_binary_format_names_the_root(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=f"--data.root: {tmp_path}: Dataset not found or corrupted"):
        CIFAR10DataModule(str(tmp_path)).setup("validate")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_analysis_loader_deals_out_whole_batches(tmp_path, world):
    make_image_folder(tmp_path, "test", 10, 1)  # 10 images, batches of 4: sizes 4, 4, 2
    dm = CIFAR10DataModule(str(tmp_path), batch_size=4, num_workers=0)
    whole = [y.tolist() for _, y in dm.analysis_dataloader()]
    shards = [[y.tolist() for _, y in dm.analysis_dataloader(rank, world)] for rank in range(world)]
    assert [len(dm.analysis_dataloader(rank, world)) for rank in range(world)] == [len(s) for s in shards]
    # rank r holds batches r, r + world, ... of the unsharded order, each image once in all
    assert all(shards[rank] == whole[rank::world] for rank in range(world))
    if world == 4:
        assert shards[3] == []  # more ranks than batches: nothing to read
