"""The type stub of the compiled core (python/kindred/_core.pyi) names exactly what the module holds."""

import ast
from pathlib import Path

from kindred import _core

STUB = Path(__file__).resolve().parents[1] / "python" / "kindred" / "_core.pyi"


def test_stub_lists_every_public_name_of_the_core():
    tree = ast.parse(STUB.read_text())
    listed = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "__all__"
    )
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    public = {n for n in dir(_core) if not n.startswith("_")}
    cuda_only = set() if _core.cuda_compiled() else {"cuda_load_info"}  # bound only in a CUDA build
    assert set(listed) - cuda_only == public, (
        "regenerate python/kindred/_core.pyi: pybind11-stubgen kindred._core"
    )
    assert {n for n in public if callable(getattr(_core, n))} <= defined
