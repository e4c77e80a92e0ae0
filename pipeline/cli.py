"""The command line every pipeline entry point shares: `--params FILE` and `-S key=value` overrides."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xbmcore import portable
from xbmcore.backbones import resolve_input
from xbmcore.config import Params, load_params


def add_params_arguments(ap: argparse.ArgumentParser, example: str = "", params: str = "params.yaml") -> None:
    """`--params` (default `params`: the stages take it relative to where they run, a bench its own project's)
    and the repeatable `-S KEY=VALUE` into `args.overrides`."""
    ap.add_argument("--params", default=params,
                    help="params file; its folder is the project root (default: %(default)s)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a param, like `dvc exp run -S`{example} (repeatable)")


def load_cli_params(args: argparse.Namespace) -> tuple[Params, Path] | None:
    """(params, project root), or None after printing the schema's error (it names the key): exit status 2.

    The `data` keys that say auto are resolved from the model's input here (xbmcore.backbones.resolve_input), so
    every stage sees the sizes, the filter and the normalisation of the model's weights."""
    try:
        params = load_params(args.params, args.overrides)
        root = Path(args.params).resolve().parent
        params = resolve_input(params, root)
    except ValueError as err:
        print(err, file=sys.stderr)
        return None
    return params, root


def enter_portable(argv: list[str] | None = None, params: str = "params.yaml") -> None:
    """First thing in an entry point that trains or embeds, before torch loads: train.portable's switches from
    the params that `--params` and `-S` give (xbmcore.portable.enter). Bad params are left for the entry point
    itself to report."""
    ap = argparse.ArgumentParser(add_help=False)
    add_params_arguments(ap, params=params)
    args, _ = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        params = load_params(args.params, args.overrides)
    except (ValueError, OSError):
        return
    portable.enter(params.train.portable)
