"""A griffe extension for the API reference: critnet's docstrings are Google-style but use Sphinx roles
(``:class:`~critnet.results.Ranking```), bare doctest examples (``>>>`` lines outside an ``Examples:`` section) and
argument entries that share one description (``low, high: the range ...``). Markdown knows none of them: a role
shows as literal text, a ``>>>`` line becomes a nested block quote, whose ``rows[0]["kind"]`` even reads as a
reference link that ``mkdocs build --strict`` rejects, and griffe warns that ``low, high`` is no parameter (which
fails the strict build too). This rewrites all three before mkdocstrings renders the docstrings, leaving the
source untouched.

Roles become autorefs marked ``optional``: a link where the target is on the site, plain code where it is not
(a private helper), so that naming an undocumented object never fails the strict build.
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(?P<target>[^`]+)`")
# the lazily exported names of `critnet` (its `__getattr__`), which static analysis cannot follow
TOP_LEVEL = "critnet"


class SphinxRolesAndDoctests(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != TOP_LEVEL:
            return
        for obj in _walk(pkg, set()):
            if obj.docstring is not None:
                text = split_shared_arguments(obj.docstring.value)
                obj.docstring.value = fence_doctests(replace_roles(text, obj))


def _walk(obj: griffe.Object, seen: set[str]):
    if obj.path in seen:
        return
    seen.add(obj.path)
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member, seen)


def resolve(target: str, obj: griffe.Object) -> str | None:
    """The full dotted path ``target`` names from where ``obj`` is defined, or None."""
    if target.startswith(f"{TOP_LEVEL}."):
        return target
    head, _, rest = target.partition(".")
    try:
        path = obj.resolve(head)
    except Exception:  # griffe raises NameResolutionError, or fails on names it cannot follow at all
        return None
    return f"{path}.{rest}" if rest else path


def replace_roles(text: str, obj: griffe.Object) -> str:
    def role(match: re.Match) -> str:
        target = match["target"].strip()
        title = target
        if target.startswith("~"):
            target = target[1:]
            title = target.rsplit(".", 1)[-1]
        target = target.lstrip(".")
        path = resolve(target, obj)
        code = f"<code>{html.escape(title)}</code>"
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return ROLE.sub(role, text)


def fence_doctests(text: str) -> str:
    """Wrap each run of ``>>>`` lines (with their continuation and output lines) in a ``pycon`` fence, unless it is
    already in a fence or an indented section (griffe parses an ``Examples:`` section's doctests itself)."""
    out: list[str] = []
    lines = text.splitlines()
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i])
            i += 1
        if out and out[-1].strip():
            out.append("")
        out += ["```pycon", *block, "```", ""]
    return "\n".join(out)


SECTION = re.compile(r"^(?P<indent>\s*)(Args|Arguments|Parameters|Attributes|Other Parameters):\s*$")
NAMES = re.compile(r"^(?P<names>\w+(?:\s*,\s*\w+)+),?$")


def split_shared_arguments(text: str) -> str:
    """``a, b: description`` in an argument section becomes one entry per name, each with the description; the
    names may run on into the entry's next line (``device, memory_budget_mb,`` / ``progress: as for ...``)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        section = SECTION.match(lines[i])
        i += 1
        if not section:
            continue
        entry_indent = None
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(section["indent"])):
            line = lines[i]
            if entry_indent is None and line.strip():
                entry_indent = _indent(line)
            if line.strip() and _indent(line) == entry_indent:
                entry = [line]
                j = i + 1
                while j < len(lines) and lines[j].strip() and _indent(lines[j]) > entry_indent:
                    entry.append(lines[j])
                    j += 1
                out += _split_entry(entry, entry_indent)
                i = j
            else:
                out.append(line)
                i += 1
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_entry(entry: list[str], indent: int) -> list[str]:
    joined = " ".join(line.strip() for line in entry)
    head, colon, description = joined.partition(":")
    match = NAMES.match(head.strip())
    if not colon or not match or "(" in head:
        return entry
    names = [name.strip() for name in match["names"].split(",")]
    return [f"{' ' * indent}{name}: {description.strip()}" for name in names]
