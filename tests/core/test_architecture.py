"""docs/ARCHITECTURE.md lists every module of the package and of models/, and nothing else."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _listed() -> set[str]:
    """Paths in the module tree: a line's first word ending in / or .py, placed by its indentation."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    tree = re.search(r"```\n(onnxzip/\n.*?)```", text, re.S).group(1)
    folders: list[str] = []
    listed = set()
    for line in tree.splitlines():
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if not word.endswith(("/", ".py")):
            continue  # a description's continuation
        depth = (len(line) - len(line.lstrip())) // 2
        folders = folders[:depth]
        if word.endswith("/"):
            folders.append(word.rstrip("/"))
            listed.add("/".join(folders) + "/")
        else:
            listed.add("/".join([*folders, word]))
    return listed


def test_architecture_lists_every_module_and_nothing_else():
    listed = _listed()
    modules = {str(p.relative_to(ROOT)) for top in ("onnxzip", "models") for p in (ROOT / top).rglob("*.py")}
    folders = {str(p.relative_to(ROOT)) + "/" for top in ("onnxzip", "models") for p in (ROOT / top).rglob("*")
               if p.is_dir() and p.name != "__pycache__"} | {"onnxzip/", "models/"}
    missing = {m for m in modules if not m.endswith("__init__.py")} - listed
    assert not missing, f"docs/ARCHITECTURE.md does not list {sorted(missing)}"
    stale = listed - modules - folders
    assert not stale, f"docs/ARCHITECTURE.md lists what does not exist: {sorted(stale)}"
