"""kindred.bakeoff: several candidate models through the same protocol, one report.

    import kindred.bakeoff as kb
    report = kb.run("bakeoff.yaml")          # or a dict; see kindred.bakeoff.config
    report["winner"], report["paths"]["html"]

Per candidate: plan (memory and time on the target GPU), the base on the battery, a fine-tune with the same
data and LoRA settings, the tuned model on the battery; then a blind comparison of the tuned models, the
weighted comparison from measured pass rates and speeds, the decision checklist, and the winner exported on
request. Resumable: a killed bake-off started again continues with the first unfinished stage.
From the shell: ``kindred bakeoff bakeoff.yaml [--restart] [--set key=value]``.
"""

from ..lazy import lazy_exports

# Names load from their modules on first use (the CLI's parser imports no torch).
_EXPORTS = {
    "CRITERIA": "config",
    "BakeoffConfig": "config",
    "Candidate": "config",
    "load_config": "config",
    "STAGES": "runner",
    "Bakeoff": "runner",
    "run": "runner",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
