"""MkDocs hooks. The site's home page is the README itself, so that the repository's front page and the site's
cannot drift apart: its links into ``docs/`` are made relative to the site's root, where the pages are."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files


def on_files(files: Files, config) -> Files:
    readme = Path(config.config_file_path).parent / "README.md"
    text = re.sub(r"\]\(docs/", "](", readme.read_text(encoding="utf-8"))
    files.append(File.generated(config, "index.md", content=text))
    return files
