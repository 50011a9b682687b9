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

from .battery import Battery, Test, load_battery, parse_battery, shipped_battery
from .checks import KINDS, Check, CheckResult, is_refusal
from .judge import Judge, load_judge
from .loops import RULES, LoopConfig, LoopDetector, LoopReport, compression_ratio, seq_rep_n
from .results import SCHEMA, SCHEMA_VERSION, EvalResults, merge
from .run import Variant, evaluate, evaluate_loaded
from .scoring import Sample
from .stats import bradley_terry, mcnemar_exact, wilson_interval
from .table import print_results

__all__ = [
    "KINDS",
    "RULES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Battery",
    "Check",
    "CheckResult",
    "EvalResults",
    "Judge",
    "LoopConfig",
    "LoopDetector",
    "LoopReport",
    "Sample",
    "Test",
    "Variant",
    "bradley_terry",
    "compression_ratio",
    "evaluate",
    "evaluate_loaded",
    "is_refusal",
    "load_battery",
    "load_judge",
    "mcnemar_exact",
    "merge",
    "parse_battery",
    "print_results",
    "seq_rep_n",
    "shipped_battery",
    "wilson_interval",
]
