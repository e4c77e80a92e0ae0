"""The command line every pipeline entry point shares: `--params FILE` and `-S key=value` overrides."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xbmcore.config import Params, load_params


def add_params_arguments(ap: argparse.ArgumentParser, example: str = "", params: str = "params.yaml") -> None:
    """`--params` (default `params`: the stages take it relative to where they run, a bench its own project's)
    and the repeatable `-S KEY=VALUE` into `args.overrides`."""
    ap.add_argument("--params", default=params,
                    help="params file; its folder is the project root (default: %(default)s)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a param, like `dvc exp run -S`{example} (repeatable)")


def load_cli_params(args: argparse.Namespace) -> tuple[Params, Path] | None:
    """(params, project root), or None after printing the schema's error (it names the key): exit status 2."""
    try:
        params = load_params(args.params, args.overrides)
    except ValueError as err:
        print(err, file=sys.stderr)
        return None
    return params, Path(args.params).resolve().parent
