"""Unreadable image files (truncated, not an image): one error line naming the file, or left out with
``--data.skip_unreadable true`` and listed in metrics.json, with and without DataLoader worker processes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from conftest import PRESETS
from critnet.cli import main
from critnet.data import CIFAR10DataModule, ImageReadError, image_folder
from critnet.errors import one_line

READABLE = 10


def truncated_jpeg() -> bytes:
    """The first 300 bytes of a real JPEG: PIL reads the header, then fails to decode."""
    buffer = io.BytesIO()
    Image.effect_noise((32, 32), 40).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()[:300]


def cifar_tree(root: Path, *bad: str) -> dict[str, Path]:
    """A CIFAR ImageFolder test split with one readable image per class (PNG and JPEG) and the ``bad`` files
    ("truncated", "text") in class03 after its readable one: dataset indices 4 and 5 when both are there."""
    for c in range(10):
        folder = root / "test" / f"class{c:02d}"
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), (25 * c, 40, 128)).save(folder / ("0000.png" if c % 2 else "0000.jpg"))
    files = {"truncated": root / "test/class03/0001.jpg", "text": root / "test/class03/0002.jpg"}
    if "truncated" in bad:
        files["truncated"].write_bytes(truncated_jpeg())
    if "text" in bad:
        files["text"].write_text("this is not an image\n")
    return {kind: files[kind] for kind in bad}


def tree_with_a_bad_image_on_rank_1(root: Path) -> Path:
    """A tree whose one unreadable image is dataset index 5: the second rank's under two-process DDP (rank r
    reads indices r, r + 2, …). Returns that image's path."""
    bad = cifar_tree(root, "truncated")["truncated"]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "test/class03/0000a.png")  # sorts before it: index 4
    return bad


def cli_args(root: Path, out: Path, workers: int, *extra: str) -> list[str]:
    return ["-c", str(PRESETS / "resnet20_cifar10.yaml"), "--data.root", str(root), "--model.weights", "null",
            "--data.batch_size", "2", "--data.num_workers", str(workers), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out), *extra]


# The image is read in the main process with 0 workers and in a worker process with 2.
@pytest.mark.parametrize("kind, workers", [("truncated", 2), ("text", 0)])
def test_an_unreadable_image_is_one_error_line_naming_it(tmp_path, capsys, kind, workers):
    bad = cifar_tree(tmp_path / "data", kind)[kind]
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *cli_args(tmp_path / "data", tmp_path / "out", workers)])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot read image {bad}: ") and "--data.skip_unreadable true" in line


def test_skip_unreadable_leaves_them_out_and_lists_them(tmp_path, capsys):
    bad = cifar_tree(tmp_path / "data", "truncated", "text")
    # batches of 2: the images 4 and 5 are a batch of unreadable images only; read by worker processes, whose
    # state does not flow back
    main(["validate", *cli_args(tmp_path / "data", tmp_path / "out", 2, "--data.skip_unreadable", "true")])
    (path,) = (tmp_path / "out").glob("lightning_logs/version_*/metrics.json")
    record = json.loads(path.read_text())
    assert record["samples"] == READABLE
    assert record["skipped_images"] == 2 and record["skipped_paths"] == sorted(str(p) for p in bad.values())
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped")]
    assert notes == [f"skipped 2 unreadable image(s) (--data.skip_unreadable), listed in {path}"]


def test_predict_has_no_row_for_a_skipped_image(tmp_path, capsys):
    cifar_tree(tmp_path / "data", "truncated", "text")
    main(["predict", *cli_args(tmp_path / "data", tmp_path / "out", 0, "--data.skip_unreadable", "true")])
    (path,) = (tmp_path / "out").glob("lightning_logs/version_*/predictions.csv")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    # `sample` stays the index in the split; the class of index i is the class folder it sits in
    assert [int(r["sample"]) for r in rows] == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert [int(r["target"]) for r in rows] == list(range(10))
    assert "skipped 2 unreadable image(s), not in predictions.csv" in capsys.readouterr().out


def test_fit_counts_the_skipped_training_images(tmp_path, capsys):
    cifar_tree(tmp_path / "data", "truncated", "text")
    (tmp_path / "data/test").rename(tmp_path / "data/train")
    cifar_tree(tmp_path / "data", "text")
    main(["fit", *cli_args(tmp_path / "data", tmp_path / "out", 0, "--data.skip_unreadable", "true",
                           "--data.batch_size", "4", "--trainer.max_epochs", "1")])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped")]
    assert notes == ["skipped 2 unreadable training and 1 validation image(s) (--data.skip_unreadable)"]


def test_analysis_loaders_skip_the_same_images_on_every_pass(tmp_path):
    bad = cifar_tree(tmp_path, "truncated", "text")
    dm = CIFAR10DataModule(str(tmp_path), batch_size=2, num_workers=0, skip_unreadable=True)
    whole = [y.tolist() for x, y in dm.analysis_dataloader()]
    assert whole == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]  # the batch of indices 4, 5 is left out
    assert [y.tolist() for _, y in dm.analysis_dataloader()] == whole
    shards = [[y.tolist() for _, y in dm.analysis_dataloader(rank, 2)] for rank in range(2)]
    assert shards == [[[0, 1], [6, 7]], [[2, 3], [4, 5], [8, 9]]]  # rank 0's second batch was images 4, 5
    assert dm.skipped_images() == sorted(str(p) for p in bad.values())
    assert dm.skipped_indices() == [4, 5] and dm.skipped_images("train") == []


def test_skipped_images_gathers_the_ranks(tmp_path, monkeypatch):
    bad = cifar_tree(tmp_path, "truncated")["truncated"]
    dm = CIFAR10DataModule(str(tmp_path), batch_size=4, num_workers=0, skip_unreadable=True)
    list(dm.analysis_dataloader())
    other_rank = ["/elsewhere/a.jpg", str(bad)]
    monkeypatch.setattr("critnet.data.all_gather_objects", lambda local: [local, other_rank])
    assert dm.skipped_images() == [str(bad)]
    assert dm.skipped_images(gather=True) == ["/elsewhere/a.jpg", str(bad)]


def test_an_error_raised_in_a_loader_worker_reports_its_own_message(tmp_path):
    """Loaders built outside the datamodule (over its datasets) still raise in the worker: the CLI's line must be
    the original message, not torch's re-raised worker traceback."""
    bad = cifar_tree(tmp_path, "text")["text"]
    dataset = image_folder(tmp_path / "test", lambda image: 0)
    with pytest.raises(ImageReadError) as raised:
        list(DataLoader(dataset, batch_size=12, num_workers=1))
    assert "Traceback" in str(raised.value)
    assert one_line(raised.value) == f"cannot read image {bad}: not an image in a format PIL can read"


def test_the_analysis_json_files_list_the_skipped_images(tmp_path):
    bad = cifar_tree(tmp_path / "data", "truncated", "text")
    for preset, name in (("rank_seed.yaml", "ranking.json"), ("prune_neurons.yaml", "prune_sweep.json")):
        cli = main(["validate", *cli_args(tmp_path / "data", tmp_path / preset, 0, "-c", str(PRESETS / preset),
                                          "--data.skip_unreadable", "true")])
        record = json.loads((Path(cli.trainer.log_dir) / name).read_text())
        assert record["skipped_images"] == 2 and record["skipped_paths"] == sorted(map(str, bad.values()))


def test_under_ddp_the_rank_that_waits_for_the_stopped_one_says_so_in_one_line(ddp_runs):
    """The last run of tests/ddp_runs.py: two DDP processes, the unreadable image on rank 1. Rank 1 stops with the
    one line naming the file; rank 0, waiting for it in a collective, used to print gloo's broken-connection
    traceback and exit 1."""
    ranks = [json.loads((ddp_runs / "unreadable" / f"rank{r}.json").read_text()) for r in (0, 1)]
    bad = ranks[1]["bad"]
    assert ranks[1]["code"] == 2 and ranks[1]["errors"][0].startswith(f"error: cannot read image {bad}: ")
    assert ranks[0]["code"] == 2 and ranks[0]["errors"] == [
        "error: another process of this distributed run stopped (its message above says why); this one stops with it"]
    for rank in ranks:
        assert len(rank["errors"]) == 1 and "Traceback" not in rank["stderr"]
