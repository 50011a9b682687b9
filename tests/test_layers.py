"""The import layers of python/kindred: every module imports only from its own layer or lower ones (parsed
with ast, imports inside functions included), and ``import kindred`` / ``kindred --help`` load no subpackage
and no torch (subpackages are imported on first use)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import kindred_path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "kindred"

# Lowest first; README.md's "Layers" section states the same order. "kindred" is the root package (its
# version and the names it re-exports from errors and _core; subpackages only through __getattr__).
LAYERS = [
    "errors",
    "lazy",
    "bounded",
    "atomic",
    "_core",
    "kindred",
    "_ops",
    "weights",
    "ops",
    "data",
    "formats",
    "nn",
    "models",
    "generate",
    "eval",
    "plan",
    "export",
    "train",
    "bakeoff",
    "installation",
    "demo",
    "format_compare",
    "cli",
    "__main__",
]
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kindred"


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    base = PACKAGE.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or name == "kindred._core"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, kindred module) of every import in the file, relative imports resolved."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kindred"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kindred":
                continue
            for alias in node.names:  # `from . import x` names a submodule x, or a name of the package
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if is_module(sub) else target))
    return out


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    missing = {layer(module_name(p)) for p in all_modules()} - set(RANK)
    assert not missing, f"modules outside LAYERS: {sorted(missing)}"


def test_no_import_from_a_higher_layer():
    edges = []
    for path in all_modules():
        me = module_name(path)
        for line, target in imported_modules(path):
            if RANK[layer(target)] > RANK[layer(me)]:
                edges.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} imports {target}")
    assert not edges, "imports from a higher layer:\n" + "\n".join(edges)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "kindred"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "nn").mkdir()
    for f in ("__init__.py", "ops/__init__.py", "nn/__init__.py", "nn/lora.py", "weights.py"):
        (pkg / f).write_text("")
    (pkg / "ops" / "lora.py").write_text("def f():\n    from ..nn import lora\n    from .. import weights\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert imported_modules(pkg / "ops" / "lora.py") == [(2, "kindred.nn.lora"), (3, "kindred.weights")]


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": kindred_path(), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_kindred_loads_no_subpackage_no_core_and_no_torch():
    loaded = _run(
        "import sys, kindred; print(sorted(m for m in sys.modules if m.startswith(('kindred.', 'torch'))))"
    )
    assert loaded == "['kindred.errors']"
    assert _run("import kindred; print(kindred.nn.Linear4bit.__name__)") == "Linear4bit"
    assert _run("import kindred; print(kindred.cuda_compiled() in (True, False))") == "True"


def test_kindred_doctor_imports_torch_before_the_core():
    """On an H200 machine torch imported after kindred's core segfaulted: the doctor loads torch first."""
    code = (
        "import sys, runpy\n"
        "order = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('torch', 'kindred._core'): order.append(name)\n"
        "sys.meta_path.insert(0, Watch())\n"
        "sys.argv = ['kindred', 'doctor', '--short']\n"
        "try:\n"
        "    runpy.run_module('kindred', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(order[:2])\n"
    )
    assert _run(code).splitlines()[-1] == "['torch', 'kindred._core']"


def test_the_cli_parser_loads_no_torch():
    code = "import sys; from kindred import cli; cli.build_parser(); print('torch' in sys.modules)"
    assert _run(code) == "False"


@pytest.mark.parametrize("package", ["kindred.data"])
def test_lazy_exports_resolve(package):
    code = f"import {package} as p; print(all(getattr(p, n) is not None for n in p.__all__))"
    assert _run(code) == "True"


def test_lazy_names_are_not_shadowed_by_their_modules():
    # A lazy export named like its own module is replaced by the module once anything imports it.
    import importlib

    import kindred.data

    for name, module in kindred.data._EXPORTS.items():
        importlib.import_module(f"kindred.data.{module}")
        assert name != module, f"kindred.data.{name} would be shadowed by the module of the same name"
    assert callable(kindred.data.prepare)
