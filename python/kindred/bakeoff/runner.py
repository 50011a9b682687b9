"""The bake-off: the same data, LoRA settings and battery for every candidate, then a blind comparison.

Per candidate: ``plan`` (memory and time estimates on the target GPU) → ``base_eval`` (the base on the
battery) → ``train`` (kindred.train, resumed from its checkpoints when killed mid-run) → ``tuned_eval``.
Then over all candidates: ``compare`` (blind pairwise comparison of the tuned models' answers, by the judge
model, or a person at the terminal), the report (kindred.bakeoff.report) and, on request, ``export`` of the
winner. Every stage's result is written atomically to ``state/`` when it ends; a bake-off started again
with the same config skips what is done. A stage that fails (out of memory, say) is recorded and its
candidate's later stages are skipped; the others go on. Everything checkable is checked first
(kindred.bakeoff.preflight), before any weights load.
"""

from __future__ import annotations

import gc
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import KindredError
from . import preflight as pf
from .config import BakeoffConfig, load_config, to_dict
from .state import GLOBAL, StateStore, write_json

STAGES = ("plan", "base_eval", "train", "tuned_eval")


def _print(msg: str) -> None:
    print(f"kindred bakeoff: {msg}", flush=True)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def target_gpu(spec: str, device: str):
    """The GPU the plan is for: a GPU id or name, a size in GB, or auto (this CUDA device; on a machine
    without one, its host memory, since kindred then trains on the CPU)."""
    import dataclasses
    import os

    from ..plan import custom_gpu, get_gpu

    if spec != "auto":
        try:
            return custom_gpu(float(spec))
        except ValueError:
            return get_gpu(spec)
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(0)
        try:
            return get_gpu(props.name)
        except KindredError:
            return dataclasses.replace(custom_gpu(props.total_memory / 1e9), name=props.name)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return dataclasses.replace(custom_gpu(ram), id="cpu", name="this machine's memory (no GPU)")


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Bakeoff:
    def __init__(self, cfg: BakeoffConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.log = log or _print
        self.device = _device(cfg.device)
        self.out = cfg.out_dir
        self.store = StateStore(self.out)

    # -- checks --------------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Every check that needs no weights (see kindred.bakeoff.preflight)."""
        from ..data import read_chat

        cfg = self.cfg
        try:
            self.chat = read_chat(cfg.data["path"], skip_invalid=bool(cfg.data.get("skip_invalid", False)))
        except KindredError as e:
            raise type(e)(f"{cfg.where}: data.path: {e}") from None
        self.resolved = [pf.resolve_candidate(cfg, i, self.device) for i in range(len(cfg.candidates))]
        self.train_cfgs = {}
        for r in self.resolved:
            try:
                r.tokens = pf.token_stats(r, self.chat, cfg.data)
            except KindredError as e:
                raise type(e)(f"{cfg.where}: candidates ({r.name}), template {r.template!r}: {e}") from None
            self.train_cfgs[r.name] = pf.check_train_config(cfg, r, self.device)
            self.train_cfgs[r.name]["output"]["save_every"] = cfg.save_every
        self.battery = pf.check_battery(cfg, self.resolved)
        pf.check_judge(cfg)
        self.gpu = target_gpu(cfg.gpu, self.device)

    # -- stages --------------------------------------------------------------------------------------------
    def _stage(self, who: str, stage: str, settings, fn) -> dict:
        record = self.store.get(who, stage, settings)
        if record is not None and record["status"] == "done":
            self.log(f"{who}: {stage}: done earlier ({record['finished_at']}); skipped")
            return record
        t0 = time.perf_counter()
        self.log(f"{who}: {stage} ...")
        import torch

        try:
            result, status = fn(), "done"
        except (KindredError, torch.OutOfMemoryError) as e:  # this candidate stops here; the others go on
            result, status = {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}, "failed"
            self.log(f"{who}: {stage}: FAILED: {result['error']}")
        _free()
        record = self.store.put(who, stage, settings, result, status, time.perf_counter() - t0)
        if status == "done" and result.get("line"):
            self.log(f"{who}: {stage}: {result['line']} ({record['seconds']:.1f} s)")
        return record

    def _skip(self, who: str, stage: str, why: str) -> dict:
        self.log(f"{who}: {stage}: skipped ({why})")
        return {"status": "skipped", "result": {"why": why}, "stage": stage, "candidate": who}

    def _settings(self, r: pf.Resolved, stage: str) -> dict:
        cfg = self.cfg
        base = {"candidate": vars(r.cand), "template": r.template, "quant": cfg.quant, "dtype": cfg.dtype}
        train = {"data": cfg.data, "lora": cfg.lora, "train": cfg.train, "device": self.device}
        battery = {"battery": self.battery.to_dict().get("sha256"), "eval": cfg.eval}
        return {
            "plan": {**base, **train, "gpu": cfg.gpu},
            "base_eval": {**base, **battery},
            "train": {**base, **train},
            "tuned_eval": {**base, **train, **battery},
        }[stage]

    def _plan(self, r: pf.Resolved) -> dict:
        from ..plan import PlanSettings, plan

        cfg = self.cfg
        spec = pf.spec_of(r, self.out)
        tc = self.train_cfgs[r.name]
        row = tc["data"].get("pack") or tc["data"].get("budget", 4096)
        micro = tc["train"].get("micro_batch_tokens") or row
        settings = PlanSettings(
            method="lora" if cfg.quant == "none" else "qlora",
            seq=row,
            batch=max(1, micro // row),
            rank=int(cfg.lora.get("r", 16)),
            policy=tc["train"].get("gradient_checkpointing", "full"),
            optimizer=tc["train"].get("optimizer", "adamw"),
            epochs=float(tc["train"].get("epochs", 1.0)),
            tokens_p95=r.tokens["p95_tokens"] or None,
            dataset_tokens=r.tokens["total_tokens"] or None,
            trained_share=r.tokens["trainable_share"] or 1.0,
        )
        rec = plan([spec], self.gpu, settings)[0]
        parts = (rec["breakdown"]["training"] or {}).get("parts_gib", {})
        fits = rec["fits_train"]
        line = (
            f"training needs ~{_size(rec['train_gib'])} of {self.gpu.name} ({self.gpu.memory_gb:g} GB): "
            + ("fits" if fits else "does NOT fit")
            if rec["train_gib"] is not None
            else f"no memory estimate ({rec['error']})"
        )
        return {
            "line": line,
            "gpu": self.gpu.to_dict(),
            "spec": {
                "id": spec.id,
                "params": spec.param_counts()["total"],
                "vocab": spec.vocab,
                "context": spec.context,
            },
            "fits_train": fits,
            "train_gib": rec["train_gib"],
            "logits_gib": parts.get("logits"),
            "infer_gib": rec["infer_gib"],
            "train_tok_s_estimate": rec["train_tok_s"],
            "train_hours_estimate": rec["train_hours"],
            "decode_tok_s_estimate": rec["decode_tok_s"],
            "kindred": rec["kindred"],
            "error": rec["error"],
        }

    def _eval_kwargs(self, r: pf.Resolved) -> dict:
        ev = self.cfg.eval
        return {
            "quant": self.cfg.quant,
            "dtype": self.cfg.dtype,
            "device": self.device,
            "template": r.template,
            "tokenizer": r.tokenizer,
            "max_new_tokens": ev.get("max_new_tokens"),
            "batch_size": ev.get("batch_size"),
            "loop_stop": ev.get("loop_stop", True),
        }

    @staticmethod
    def _summary(res, name: str, out: Path) -> dict:
        from ..plan.score import rubric_check

        paths = res.write(out)
        s = res.summary()[name]
        lat = s["latency"]
        return {
            "results": str(paths["results"]),
            "tests": s["tests"],
            "passed": s["passed"],
            "pass_rate": s["pass_rate"],
            "pass_ci95": s["pass_ci95"],
            "loops": s["loops"]["rate"],
            "substantive": s["substantive"]["rate"],
            "decode_tok_s_p50": lat["tokens_per_s_p50"],
            "throughput_tok_s": lat["throughput_tokens_per_s"],
            "ttft_p50_s": lat["ttft_p50_s"],
            "advice": rubric_check(s["pass_rate"])["detail"],
            "line": f"{s['passed']}/{s['tests']} passed; {lat['tokens_per_s_p50'] or 0:.1f} tokens/s (p50)",
        }

    def _base_eval(self, r: pf.Resolved) -> dict:
        from ..eval import evaluate

        res = evaluate(self.battery, r.source, include_base=True, base_name=r.name, **self._eval_kwargs(r))
        out = self._summary(res, r.name, self.out / r.name / "base_eval")
        out["line"] += f"; {out['advice']}"
        return out

    def _train(self, r: pf.Resolved) -> dict:
        from ..train import latest_checkpoint
        from ..train import train as run_train

        tc = self.train_cfgs[r.name]
        run_dir = Path(tc["output"]["dir"])
        resume = latest_checkpoint(run_dir) is not None
        res = run_train(tc, resume=resume)
        rows = res.metrics
        speeds = [m["tokens_per_s"] for m in rows[1:]] or [m["tokens_per_s"] for m in rows]
        mem = [m["gpu_mem_gib"] for m in rows if m.get("gpu_mem_gib") is not None]
        out = {
            "adapter": str(res.adapter_dir),
            "run": str(run_dir),
            "steps": res.step,
            "resumed": resume,
            "loss_curve": [[m["step"], m["loss"]] for m in rows],
            "final_loss": rows[-1]["loss"] if rows else None,
            "eval_losses": [list(x) for x in res.eval_losses],
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "elapsed_s": rows[-1]["elapsed_s"] if rows else None,
            "gpu_mem_gib_peak": max(mem) if mem else None,
            "host_mem_gib_peak": _host_peak_gib(),
            "device": self.device,
        }
        out["line"] = (
            f"{res.step} steps, loss {out['final_loss']:.4f}, {out['tokens_per_s'] or 0:,.0f} tokens/s"
        )
        del res
        return out

    def _tuned_eval(self, r: pf.Resolved, adapter: str) -> dict:
        from ..eval import evaluate

        res = evaluate(self.battery, r.source, {r.name: adapter}, include_base=False, **self._eval_kwargs(r))
        return self._summary(res, r.name, self.out / r.name / "tuned_eval")

    def _compare(self, done: list[str], records: dict) -> dict:
        from ..eval import EvalResults, merge
        from ..eval.compare import compare

        cfg = self.cfg.compare
        runs = [EvalResults.load(records[n]["tuned_eval"]["result"]["results"]) for n in done]
        merged = merge(runs)
        judge = None
        if cfg.judge:
            from ..eval import load_judge

            judge = load_judge(
                cfg.judge,
                where=f"{self.cfg.where}: compare.judge",
                quant=self.cfg.quant,
                device=self.device,
                max_new_tokens=cfg.max_new_tokens,
            )
        merged.write(self.out / "compare-input", html=False)
        if judge is None and not sys.stdin.isatty():
            raise KindredError(
                "no compare.judge and no terminal for a person to choose: set compare.judge, or run "
                f"kindred eval compare {self.out / 'compare-input' / 'results.json'}"
            )
        record = compare(merged, models=done, judge=judge, seed=cfg.seed)
        write_json(self.out / "compare.json", record)
        tally = record["tally"]
        return {
            "path": str(self.out / "compare.json"),
            "mode": record["mode"],
            "judge": record["judge"],
            "tally": tally,
            "line": f"{tally['graded']} of {tally['pairs']} pairs graded ({record['mode']})",
        }

    def _export(self, winner: pf.Resolved, adapter: str) -> dict:
        from ..eval.models import resolve
        from ..export import save_merged

        plan = resolve(
            winner.source,
            {"tuned": adapter},
            quant="none",
            dtype="fp32" if self.device == "cpu" else "bf16",
            device=self.device,
            template=winner.template,
            tokenizer=winner.tokenizer,
        )
        model = plan.load()
        target = self.out / "export" / winner.name
        target.parent.mkdir(parents=True, exist_ok=True)
        # overwrite: only an export this bake-off began and did not finish (a finished one is not run again)
        path = save_merged(
            model,
            winner.hf_config,
            target,
            plan.tokenizer,
            base=winner.source if winner.source.is_dir() else None,
            overwrite=True,
        )
        return {"format": "merged", "path": str(path), "line": f"merged weights in {path}"}

    # -- the whole run -------------------------------------------------------------------------------------
    def run(self, restart: bool = False) -> dict:
        from .report import decide, write_report

        cfg = self.cfg
        if restart:
            for folder in [self.store.root, *(self.out / c.name for c in cfg.candidates)]:
                shutil.rmtree(folder, ignore_errors=True)
        self.preflight()
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "bakeoff-config.json", to_dict(cfg))  # what this bake-off ran with
        records: dict[str, dict] = {}
        for r in self.resolved:
            rec: dict = {}
            rec["plan"] = self._stage(r.name, "plan", self._settings(r, "plan"), lambda r=r: self._plan(r))
            rec["base_eval"] = self._stage(
                r.name, "base_eval", self._settings(r, "base_eval"), lambda r=r: self._base_eval(r)
            )
            rec["train"] = self._stage(
                r.name, "train", self._settings(r, "train"), lambda r=r: self._train(r)
            )
            if rec["train"]["status"] == "done":
                adapter = rec["train"]["result"]["adapter"]
                rec["tuned_eval"] = self._stage(
                    r.name,
                    "tuned_eval",
                    self._settings(r, "tuned_eval"),
                    lambda r=r, a=adapter: self._tuned_eval(r, a),
                )
            else:
                rec["tuned_eval"] = self._skip(r.name, "tuned_eval", "training did not finish")
            records[r.name] = rec
        done = [n for n, rec in records.items() if rec["tuned_eval"]["status"] == "done"]
        if len(done) >= 2:
            settings = {
                "compare": vars(cfg.compare),
                "runs": {
                    n: self.store.get(n, "tuned_eval", self._settings(self._by(n), "tuned_eval"))[
                        "fingerprint"
                    ]
                    for n in done
                },
            }
            comparison = self._stage(GLOBAL, "compare", settings, lambda: self._compare(done, records))
        else:
            comparison = self._skip(GLOBAL, "compare", f"{len(done)} tuned model(s); a comparison needs two")
        decision = decide(cfg, self.resolved, records, comparison)
        export = None
        if cfg.export.winner and decision["winner"]:
            w = self._by(decision["winner"])
            adapter = records[w.name]["train"]["result"]["adapter"]
            settings = {"winner": w.name, "format": cfg.export.format, "adapter": adapter}
            export = self._stage(GLOBAL, "export", settings, lambda: self._export(w, adapter))
        report = write_report(cfg, self.resolved, records, comparison, decision, export, self.gpu)
        self.log(f"report: {report['paths']['html']}; winner: {decision['winner'] or 'none'}")
        return report

    def _by(self, name: str) -> pf.Resolved:
        return next(r for r in self.resolved if r.name == name)


def run(config, *, restart: bool = False, overrides: dict | None = None, log=None) -> dict:
    """Run (or continue) a bake-off from a YAML file or dict (see kindred.bakeoff.config); returns the
    report record (also in ``out/report.json``)."""
    return Bakeoff(load_config(config, overrides), log=log).run(restart=restart)
