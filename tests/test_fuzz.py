"""The fuzz suite in CI: every kept reproducer replays to a KindredError (or a clean read) in a forked child,
and a bounded run of every target (tests/fuzz, 2.5 s each) finds no crash, hang, foreign exception or
MemoryError. The long mode is ``python -m tests.fuzz --minutes N``."""

from __future__ import annotations

import pytest

from .fuzz.child import run_in_child
from .fuzz.runner import fuzz
from .fuzz.targets import CORPUS, TARGETS, corpus_inputs, preload

SECONDS_PER_TARGET = 2.5


def _corpus():
    return [(name, path, data) for name in TARGETS for path, data in corpus_inputs(name)]


def test_every_corpus_folder_names_a_target():
    assert {p.name for p in CORPUS.iterdir() if p.is_dir()} <= set(TARGETS)
    assert len(_corpus()) >= len(TARGETS)  # at least one past failure per reader


@pytest.fixture(scope="module")
def preloaded():
    preload()


@pytest.mark.usefixtures("preloaded")
@pytest.mark.parametrize(("name", "path", "data"), _corpus(), ids=[f"{n}/{p.name}" for n, p, _ in _corpus()])
def test_corpus_replays_to_a_kindred_error(tmp_path, name, path, data):
    out = run_in_child(TARGETS[name].run, data, tmp_path, timeout=10.0)
    assert not out.failed, f"{path}: {out.kind}: {out.detail[:2000]}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bounded_fuzz_run(tmp_path, name):
    (tmp_path / "seeds").mkdir()
    seeds = TARGETS[name].build(tmp_path / "seeds")
    stats = fuzz(name, SECONDS_PER_TARGET, tmp_path / "findings", seeds, seed=1)
    assert stats.executions > 0
    assert stats.failures == 0, f"{stats.line()}\n" + "\n".join(
        f"{p}: {p.with_suffix('.txt').read_text()[:1500]}"
        for p in sorted((tmp_path / "findings").rglob("*.bin"))
    )
