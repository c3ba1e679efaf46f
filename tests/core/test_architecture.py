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


# The layers, bottom first: a module imports only modules of its own layer or below (imports inside
# functions count). errors.py is the public exception module, importable from anywhere.
LAYERS = [
    {"errors", "core"},
    {"measure", "svd", "cluster", "pruning"},
    {"passes"},
    {"evaluators"},
    {"train"},
    {"search", "models"},
    {"api", "cli", "recipe", "demo", "inspection", "plots", "torch_export", "__main__", "recipes"},
]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "onnxzip" or len(parts) == 1:
        return None if parts[0] != "onnxzip" else len(LAYERS)  # the package itself: the top
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} belongs to no layer in tests/core/test_architecture.py LAYERS")


def _imports(path: Path) -> list[tuple[str, int]]:
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "onnxzip":  # modules of the package; other names (__version__) are its own
                found += [(f"onnxzip.{alias.name}", node.lineno) for alias in node.names
                          if (ROOT / "onnxzip" / alias.name).is_dir() or (ROOT / "onnxzip" / f"{alias.name}.py").exists()]
            else:
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def test_layers_import_only_their_own_layer_or_below():
    """Maths and core at the bottom, then passes, evaluators, training, search, the API/CLI on top:
    passes never import training or search, nothing imports the API."""
    wrong = []
    for path in sorted((ROOT / "onnxzip").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        own = _layer(module)
        for target, line in _imports(path):
            layer = _layer(target)
            if layer is not None and own is not None and layer > own:
                wrong.append(f"{module} (layer {own}) imports {target} (layer {layer}) at line {line}")
    assert not wrong, "\n".join(wrong)


def test_pyproject_installs_every_package():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {"onnxzip." + ".".join(p.parent.relative_to(ROOT / "onnxzip").parts) if p.parent != ROOT / "onnxzip"
                else "onnxzip" for p in (ROOT / "onnxzip").rglob("__init__.py")}
    assert packages <= listed, f"pyproject.toml does not install {sorted(packages - listed)}"
