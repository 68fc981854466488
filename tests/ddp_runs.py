"""Every two-process (DDP, gloo) run of the CLI tests in ONE launch: ``python tests/ddp_runs.py OUT``.

Started by the session fixture ``ddp_runs`` in conftest.py. Each launch of analyze.py with ``--trainer.devices 2``
starts two interpreters that import Lightning and a gloo group; the tests of test_cli.py, test_ranking_ddp.py and
test_prune_ddp.py needed four such launches. Here the first run goes through Lightning's own launcher exactly as
``python analyze.py ...`` does (it starts rank 1 by running this same command line), and the later runs call the
same entry point, ``critnet.cli.main``, in both processes of that group, in the same order. The tests then assert
on the files under OUT:

- ``OUT/trainer_flag_type.txt``: test_cli_errors' check that a Lightning Trainer flag keeps its type when critnet
  and its command line are imported first (the first imports of this script, in a fresh interpreter);
- ``OUT/cli/ddp``: test_cli's ``validate`` of 301 images over 2 ranks;
- ``OUT/ranking/ddp``: test_ranking_ddp's ranking;
- ``OUT/prune/devices2``: test_prune_ddp's resumable sweep, run twice: after the first run rank 0 keeps the whole
  partial file as ``OUT/prune/partial_whole.jsonl`` and cuts the partial file to its first two records, as if
  stopped after two settings; the second run resumes from it;
- ``OUT/unreadable/rankRANK.json``: test_unreadable's run with an unreadable image on rank 1 (last: it breaks the
  group): each rank's exit status and error lines.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS), str(TESTS.parent)]  # tests/conftest.py, not the doctest one at the root

# test_cli_errors' typing check wants critnet, then the command line, imported first in a fresh interpreter
import critnet  # noqa: E402, F401
import critnet.cli  # noqa: E402, F401
import torch.distributed as dist  # noqa: E402

from critnet.cli import main  # noqa: E402


def trainer_flag_type() -> str:
    """What ``--trainer.limit_val_batches 1`` parses to once critnet is imported before Lightning."""
    from lightning import Trainer

    from critnet.cli import CritnetArgumentParser

    parser = CritnetArgumentParser()
    parser.add_class_arguments(Trainer, "trainer")
    return repr(parser.parse_args(["--trainer.limit_val_batches", "1"]).trainer.limit_val_batches)


DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
PRUNE_RESUME = "--trainer.callbacks.init_args.resume=true"


def run_all(out: Path) -> None:
    import test_cli
    import test_prune_ddp
    import test_ranking_ddp

    main(test_cli.cli_args(out / "cli" / "ddp", *test_cli.DDP_SUBSET, *DDP))  # Lightning starts rank 1 here
    main(test_ranking_ddp.arguments(out / "ranking" / "ddp", *DDP))
    prune = test_prune_ddp.arguments(out / "prune" / "devices2", 2, PRUNE_RESUME)
    main(prune)
    if dist.get_rank() == 0:
        (partial,) = (out / "prune" / "devices2" / "prune_partial").glob("*.jsonl")
        shutil.copyfile(partial, out / "prune" / "partial_whole.jsonl")
        lines = partial.read_text().splitlines(keepends=True)
        partial.write_text("".join(lines[:2]))
    dist.barrier()
    main(prune)
    unreadable(out)


def unreadable(out: Path) -> None:
    """Last, as it breaks the group: test_unreadable's two-process run whose unreadable image falls to rank 1.
    Each rank keeps its exit status and what it wrote to stderr; rank 1 then ends, and rank 0, waiting for it,
    finds the connection closed."""
    import contextlib
    import io
    import json

    import test_unreadable

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    folder = out / "unreadable"
    args = test_unreadable.cli_args(folder / "data", folder / "run", 0, *DDP)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            main(["validate", *args])
            code = 0
        except SystemExit as stop:
            code = stop.code
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    record = {"code": code, "errors": errors, "stderr": stderr.getvalue(),
              "bad": (folder / "bad.txt").read_text()}
    (folder / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if "LOCAL_RANK" not in os.environ:  # the process the test started, before Lightning starts rank 1
        (out / "trainer_flag_type.txt").write_text(trainer_flag_type())
        import test_unreadable

        bad = test_unreadable.tree_with_a_bad_image_on_rank_1(out / "unreadable" / "data")
        (out / "unreadable" / "bad.txt").write_text(str(bad))
    run_all(out)
