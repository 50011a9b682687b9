"""``kindred bakeoff config.yaml [--restart] [--set key=value ...]``."""

from __future__ import annotations

import argparse


class _KeysHelp(argparse.RawDescriptionHelpFormatter):
    """The help text followed by the config's keys (kindred.bakeoff.config's docstring), read when shown."""

    def format_help(self) -> str:
        from . import config

        return super().format_help() + "\nconfig keys:\n" + config.__doc__.split("\n\nUnknown keys")[0] + "\n"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bakeoff",
        help="candidate models through the same plan, eval, fine-tune, eval and blind comparison; one report",
        description="Run (or continue) a bake-off from a YAML config (keys: kindred.bakeoff.config). "
        "A killed bake-off started again continues where it stopped.",
        formatter_class=_KeysHelp,
    )
    p.add_argument("config", help="bake-off YAML")
    p.add_argument("--restart", action="store_true", help="forget finished stages and start over")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. train.max_steps=20"
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import yaml

    from ..errors import KindredError
    from .runner import run as run_bakeoff

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise KindredError(f"--set expects key=value (e.g. train.max_steps=20), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    report = run_bakeoff(args.config, restart=args.restart, overrides=overrides)
    print(f"kindred bakeoff: winner {report['winner'] or 'none'}; report {report['paths']['html']}")
    return 0
