"""Every notebook in notebooks/ runs top to bottom (on the CPU in CI) and is committed without outputs."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _execute(path: Path, cwd: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def _text(nb) -> str:
    """All stream and text/plain outputs of the executed notebook."""
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(
                o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
            )
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    nb = _execute(path, tmp_path)
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors
    if path.name == "01_quickstart.ipynb":
        _check_quickstart(nb, tmp_path / "kindred-quickstart")
    if path.name in CHECKS:
        CHECKS[path.name](_text(nb), tmp_path)


def _check_plan_and_data(text: str, work: Path) -> None:
    assert "same ids: True | same labels: True" in text  # the model's own template equals kindred's chatml
    assert "detected from line 1" in text  # the ShareGPT error names the detected format


def _check_evaluate(text: str, work: Path) -> None:
    assert (work / "kindred-evaluate" / "report" / "report.html").is_file()
    assert re.search(r"\d+ pairs; \d+ graded", text)


def _check_export(text: str, work: Path) -> None:
    assert "top-1 agreement 100.0 %" in text  # the merged model agrees with the adapter model


def _check_bakeoff(text: str, work: Path) -> None:
    report = json.loads((work / "kindred-bakeoff" / "out" / "report.json").read_text())
    assert f"winner: {report['winner']}" in text and report["winner"] in ("tiny-a", "tiny-b")
    assert (work / "kindred-bakeoff" / "out" / "export" / report["winner"] / "model.safetensors").is_file()


CHECKS = {  # what each notebook must have shown, beyond running without an error
    "02_plan_and_data.ipynb": _check_plan_and_data,
    "03_evaluate.ipynb": _check_evaluate,
    "04_export.ipynb": _check_export,
    "05_bakeoff.ipynb": _check_bakeoff,
}


def _check_quickstart(nb, work: Path) -> None:
    """The quickstart trained the tiny model: held-out loss down, plots drawn, PEFT adapter written."""
    text = _text(nb)
    before, after = map(float, re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", text).groups())
    assert after < before
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # token-length histogram, loss curve, before/after
    adapter = work / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    metrics = (work / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 8
    # the before/after eval on the shipped battery, and its report shown inline
    assert re.search(r"ethics16 pass rate \d+/16 -> \d+/16", text)
    assert (work / "eval" / "report.html").is_file() and (work / "eval" / "results.json").is_file()
    html = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any("srcdoc" in "".join(o["data"]["text/html"]) for o in html)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, path.name
