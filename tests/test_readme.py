"""The README's Python example runs as written (on fewer images, to fit the suite's time)."""

from __future__ import annotations

import os
import re

from conftest import REPO, SHARED, requires_shared


def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@requires_shared
def test_the_readme_python_example_runs(tmp_path, capsys):
    code = readme_example()
    assert "step = 10  #" in code and '"../shared/' in code
    # every 1000th image instead of every 10th, and the shared folder wherever this checkout sees it
    code = code.replace("step = 10  #", "step = 1000  #").replace('"../shared/', f'"{SHARED}/')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "'samples': 10" in out and "Ranking: resnet20" not in out and "Ranking: CifarResNet · 698 channel units" in out
    assert "split-half Spearman:" in out and "Sweep: CifarResNet · prune connections (global) · 10 images" in out
    for name in ("top_k.png", "channel_heatmap.png", "orders.png", "ranking.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert len((tmp_path / "ranking.csv").read_text().splitlines()) == 699
