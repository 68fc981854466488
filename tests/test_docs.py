"""The Python examples of the README and of the documentation pages run as written, on fewer images.

An example is a fenced block right after an HTML comment ``<!-- test: NAME -->``; a block marked
``<!-- test: NAME output -->`` is what example NAME printed. The examples show full-size runs (1,000 images and
more); here they run on two, with every change written out in ``SUBSTITUTIONS``, and each test checks what its
example printed or wrote, so that an example that stops running, or stops doing what its page says, fails.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import pytest

from conftest import REPO, RESNET20_WEIGHTS, SHARED, requires_shared

DOCS = REPO / "docs"
MARKED = re.compile(r"<!-- test: (?P<name>[\w -]+?) -->\n```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)

# The shared folder wherever this checkout sees it: the pages say ../shared, beside the repository.
SHARED_PATHS = ('"../shared/', f'"{SHARED}/')
# What each example runs with instead of what its page shows; every left-hand side must be in the example, so a
# substitution cannot silently stop applying when the page changes.
SUBSTITUTIONS = {
    "front page": [
        ("range(0, 10000, 10)", "range(0, 10000, 5000)"),
        # the CIFAR-10 test split it downloads is the shared folder's JPEG copy here: the tests download nothing
        ('CIFAR10("data", train=False, download=True, transform=normalize)',
         f'ImageFolder("{SHARED}/data/cifar10/test", normalize)'),
    ],
    "quickstart": [("step = 10  #", "step = 5000  #"), SHARED_PATHS],
    "ranking": [SHARED_PATHS],  # as written: one batch of 128 images takes seconds
    "pruning": [
        ("range(0, len(test), 10)", "range(0, len(test), 5000)"),
        ("range(0, len(train), 50)", "range(0, len(train), 25000)"),
        SHARED_PATHS,
    ],
    "fault-injection": [("range(0, len(test), 10)", "range(0, len(test), 5000)"), SHARED_PATHS],
}


def marked_blocks() -> dict[str, tuple[Path, str]]:
    blocks: dict[str, tuple[Path, str]] = {}
    for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        for match in MARKED.finditer(page.read_text(encoding="utf-8")):
            assert match["name"] not in blocks, f"two blocks are marked {match['name']!r}"
            blocks[match["name"]] = (page, match["body"])
    return blocks


def run_example(name: str, tmp_path: Path, capsys, monkeypatch, **namespace) -> str:
    page, code = marked_blocks()[name]
    for old, new in SUBSTITUTIONS[name]:
        assert old in code, f"{page.name}, example {name!r}: {old!r} is gone; update SUBSTITUTIONS"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, f"{page.name}: {name}", "exec"), {"__name__": f"example_{name}", **namespace})
    return capsys.readouterr().out


def numbers_and_words(text: str) -> tuple[list[float], list[str]]:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    return [float(n) for n in numbers], re.sub(r"-?\d+(?:\.\d+)?", "#", text).split()


def test_every_marked_example_has_a_test():
    examples = {name for name in marked_blocks() if not name.endswith(" output")}
    assert examples == set(SUBSTITUTIONS)
    assert {"front page", "quickstart", "ranking", "pruning", "fault-injection"} <= examples


@requires_shared
def test_the_front_page_example(tmp_path, capsys, monkeypatch):
    from torchvision.datasets import ImageFolder

    # weights="resnet20-cifar10" finds the published file where it would have downloaded it, and checks its sha256
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / RESNET20_WEIGHTS.name).symlink_to(RESNET20_WEIGHTS)
    monkeypatch.setenv("CRITNET_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    out = run_example("front page", tmp_path, capsys, monkeypatch, ImageFolder=ImageFolder)
    assert "Ranking: CifarResNet · 698 channel units · zero · 2 images" in out
    assert "Sweep: CifarResNet · prune connections (global) · 2 images" in out
    assert "Sweep: CifarResNet · channels pruned by criticality / l1 / random order · 2 images" in out
    assert "Campaign(340 faults, bitflip in weights, 2 images" in out  # "340 bit flips", as its comment says


@requires_shared
def test_the_quickstart(tmp_path, capsys, monkeypatch):
    out = run_example("quickstart", tmp_path, capsys, monkeypatch)
    assert "'samples': 2" in out and "Ranking: resnet20" not in out and "Ranking: CifarResNet · 698 channel units" in out
    assert "split-half Spearman:" in out and "Sweep: CifarResNet · prune connections (global) · 2 images" in out
    for name in ("top_k.png", "channel_heatmap.png", "orders.png", "ranking.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert len((tmp_path / "ranking.csv").read_text().splitlines()) == 699


@requires_shared
def test_the_ranking_example_prints_what_its_page_shows(tmp_path, capsys, monkeypatch):
    out = run_example("ranking", tmp_path, capsys, monkeypatch)
    page, shown = marked_blocks()["ranking output"]
    got_numbers, got_words = numbers_and_words(out)
    shown_numbers, shown_words = numbers_and_words(shown)
    assert got_words == shown_words
    # four decimals of float32 sums: the last one may differ on another CPU
    assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1.5e-4) for a, b in zip(got_numbers, shown_numbers, strict=True))
    assert len((tmp_path / "ranking.csv").read_text().splitlines()) == 40  # 39 weight tensors and the header

    # and the page says these are the rows of the command line's table above them
    text = page.read_text(encoding="utf-8")
    table = text[text.index("## The original experiment"):text.index("### The same ranking from Python")]
    rows = {cells[1]: cells for cells in (line.strip("|").split(" | ") for line in table.splitlines())
            if len(cells) == 6 and cells[0].strip().isdigit()}
    printed = re.findall(r"^\s*(\d+) (\S+)\s+loss\s+([\d.]+)\s+Δloss\s+([\d.]+)", out, re.M)
    assert len(printed) == 5
    for rank, unit, loss, delta in printed:
        assert [c.strip() for c in rows[unit][:4]] == [rank, unit, loss, delta]


@requires_shared
def test_the_pruning_example(tmp_path, capsys, monkeypatch):
    out = run_example("pruning", tmp_path, capsys, monkeypatch)
    assert "Sweep: CifarResNet · prune neurons (global) · 2 images" in out
    assert re.search(r"CifarResNet\s+0\.10\s+0\.50 ", out)  # the p_bern 0.5 draws, summarised
    assert "Sweep: CifarResNet · channels pruned by criticality / l1 / random order · 2 images" in out
    for name in ("prune_sweep.csv", "prune_sweep.json", "prune_sweep.md", "prune_sweep.png"):
        assert (tmp_path / "prune_neurons" / name).stat().st_size > 0
    assert (tmp_path / "orders.png").stat().st_size > 0


@requires_shared
def test_the_fault_injection_example(tmp_path, capsys, monkeypatch):
    out = run_example("fault-injection", tmp_path, capsys, monkeypatch)
    assert "Campaign(340 faults, bitflip in weights, 2 images" in out
    assert re.search(r"^critical faults: [\d.]+ % \[[\d.]+, [\d.]+\] of 340$", out, re.M)
    written = {path.name for path in (tmp_path / "faults").iterdir()}
    assert {"faults.csv", "fault_rates.csv", "fault_vulnerability.csv", "campaign.json", "fault_heatmap.png",
            "fault_layers.png"} <= written
    assert len((tmp_path / "faults" / "faults.csv").read_text().splitlines()) == 341


def api_reference_targets() -> list[str]:
    return re.findall(r"^::: (\S+)", (DOCS / "api.md").read_text(encoding="utf-8"), re.M)


def test_the_api_reference_lists_every_public_name():
    import critnet

    targets = api_reference_targets()
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    for name in critnet.__all__:
        module = getattr(critnet, name).__module__
        # documented where it is defined, under the name users write, and reachable by that name from other pages
        assert f"::: {module}.{name}\n    options:\n      heading: critnet.{name}\n" in text, name
        assert f"[](){{#critnet.{name}}}" in text, name
    # and every entry names something that exists (mkdocs build says so too, but only where the docs are built)
    for target in targets:
        parts = target.split(".")
        for split in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
            break
        else:
            pytest.fail(f"api.md: {target} does not exist")
