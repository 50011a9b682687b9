"""kindred.eval: run a battery of tests on a base model and its fine-tunes, score, report, compare.

    import kindred.eval as ke
    res = ke.evaluate("ethics16", "path/to/model", {"tuned": "runs/first/adapter"})   # base + tuned, one load
    res.write("eval-out")            # results.json, samples.jsonl, results.csv, report.html
    ke.print_results(res)            # the terminal tables
    res.summary()["tuned"]["pass_rate"], res.comparisons()[0]["mcnemar_p"]

From the shell: ``kindred eval ethics16 --model path --adapter runs/first/adapter``, then
``kindred eval compare eval-out/results.json`` (blind, by a person or a judge model). The battery format,
the check kinds and the results.json schema: kindred/eval/README.md.
"""

from ..lazy import lazy_exports

# Names load from their modules on first use (the CLI's parser imports no torch).
_EXPORTS = {
    "Battery": "battery",
    "Check": "checks",
    "CheckResult": "checks",
    "EvalResults": "results",
    "Judge": "judge",
    "KINDS": "checks",
    "LoopConfig": "loops",
    "LoopDetector": "loops",
    "LoopReport": "loops",
    "RULES": "loops",
    "SCHEMA": "results",
    "SCHEMA_VERSION": "results",
    "Sample": "scoring",
    "Test": "battery",
    "Variant": "run",
    "bradley_terry": "stats",
    "compression_ratio": "loops",
    "evaluate": "run",
    "evaluate_loaded": "run",
    "is_refusal": "checks",
    "load_battery": "battery",
    "load_judge": "judge",
    "mcnemar_exact": "stats",
    "merge": "results",
    "parse_battery": "battery",
    "print_results": "table",
    "seq_rep_n": "loops",
    "shipped_battery": "battery",
    "wilson_interval": "stats",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
