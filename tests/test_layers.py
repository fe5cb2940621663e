"""The package's layout holds its design (docs/architecture.md, "The layers"):
folders by concern, imports that run only downward, no import circle, files
short enough to read, the model file self-contained, and old import paths that
still work."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "mobilemoe_mlx"
# Bottom to top: a module may import from its own layer or a lower one.
LAYERS = [
    ("errors", [f"{PKG}.errors", f"{PKG}._version"]),
    ("model", [f"{PKG}.model"]),
    ("checkpoints", [f"{PKG}.checkpoints"]),
    ("chat", [f"{PKG}.chat"]),
    ("package", [PKG]),  # its __init__ (load, convert) and the old paths
    ("bench", ["bench"]),
    ("scripts", ["convert", "chat"]),  # the checkout's convert.py and chat.py
]
MODEL_FILE = ROOT / PKG / "model" / "mobilemoe.py"
MAX_LINES = 400


def module_files():
    files = sorted((ROOT / PKG).rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    return files + [ROOT / "convert.py", ROOT / "chat.py"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for f in module_files()}


def layer_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (rank, len(p))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def imports_of(module: str):
    """Every module of ours that `module` imports, at its top or inside a function."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                absolute = ".".join(base + ([node.module] if node.module else []))
            else:
                absolute = node.module or ""
            absolute = "bench" + absolute[len("mobilemoe_bench"):] \
                if absolute.startswith("mobilemoe_bench") else absolute
            # `from package import submodule` imports the submodule
            targets = [f"{absolute}.{a.name}" if f"{absolute}.{a.name}" in MODULES else absolute
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]  # `import a.b.c` names a.b.c's module
            if t and t != module:
                yield t, node.lineno


GRAPH = {m: sorted(set(imports_of(m))) for m in MODULES}


def test_every_import_runs_downward():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t} "
              f"({LAYERS[layer_of(m)][0]} -> {LAYERS[layer_of(t)][0]})"
              for m, edges in GRAPH.items() for t, line in edges
              if layer_of(t) > layer_of(m)]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def find_cycle(graph):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted({t for t, _ in graph[m]}):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checks_fail_where_they_should():
    # The cycle finder and the layer ranks, on made-up graphs: they can fail.
    assert find_cycle({"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": [("b", 1)], "b": []}) is None
    assert layer_of(f"{PKG}.model.mobilemoe") < layer_of(f"{PKG}.checkpoints.loading") \
        < layer_of(f"{PKG}.chat.cli") < layer_of("bench.cli")


def test_every_module_is_in_a_folder_of_its_concern():
    flat = sorted(m for m in MODULES if m.count(".") == 1 and m.startswith(PKG + ".")
                  and MODULES[m].name != "__init__.py")
    assert flat == [f"{PKG}._moved", f"{PKG}._version", f"{PKG}.errors"], flat


@pytest.mark.parametrize("path", [p for p in module_files() if p != MODEL_FILE],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_short_enough_to_read(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concern"


def test_the_model_file_is_self_contained():
    # Converted directories ship it alone as their model_file: mlx, mlx-lm and
    # the standard library only.
    tree = ast.parse(MODEL_FILE.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    relative = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"relative imports at lines {relative}"
    assert roots <= {"mlx", "mlx_lm"} | set(sys.stdlib_module_names), roots


def moved_paths():
    from mobilemoe_mlx import _moved

    return sorted(_moved.MOVED.items())


@pytest.mark.parametrize("old,new", moved_paths())
def test_an_old_import_path_gives_the_module_at_its_new_place(old, new):
    import importlib

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"{PKG}.{old}")
    if old in ("model", "chat"):  # folders now, answering for the old module's names
        name = "Model" if old == "model" else "ChatSession"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert getattr(module, name) is getattr(importlib.import_module(f"{PKG}.{new}"), name)
        return
    assert module is importlib.import_module(f"{PKG}.{new}")
    if old != "convert":  # that name is also the package's function: no warning to give
        assert any(f"{PKG}.{new}" in str(w.message) and w.category is DeprecationWarning
                   and w.filename == __file__ for w in caught), [str(w.message) for w in caught]


def test_python_dash_m_on_an_old_path_runs_the_new_one():
    out = subprocess.run([sys.executable, "-m", f"{PKG}.synthetic", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Write a random MobileMoE checkpoint" in out.stdout
    assert "mobilemoe_mlx.synthetic is now mobilemoe_mlx.checkpoints.synthetic" in out.stderr


def test_the_architecture_page_lists_each_folders_modules():
    # docs/architecture.md section 0: the table names every module of each folder.
    text = (ROOT / "docs" / "architecture.md").read_text()
    for folder in ("model", "checkpoints", "chat"):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{folder}/` |"))
        listed = {m.strip() for m in row.strip().strip("|").split("|")[-1].split(",")}
        present = {p.stem for p in (ROOT / PKG / folder).glob("*.py") if p.stem != "__init__"}
        assert listed == present, f"{folder}/: the page lists {sorted(listed)}, " \
                                  f"the folder holds {sorted(present)}"
