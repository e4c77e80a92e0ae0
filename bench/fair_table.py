"""Fig. 1a with each side at the settings it does best with on validation: test Recall@1 of a baseline and of a
memory method per batch size, each read from the results CSV of the study that ran it (bench.paper_figures),
paired by seed.

    python -m bench.fair_table \
        --pair 16 "docs/fresh_memory_fair/results.csv:baseline per-kind" \
                  "docs/fresh_memory_long/results.csv:momentum0.999" \
        --pair 256 "docs/fresh_memory_fair/results.csv:baseline per-kind" \
                   "docs/fresh_memory_fair/results.csv:momentum0.999 per-kind" \
        --out docs/fresh_memory_fair/fair.md

Only fig1a rows of the test split, memory ratio 1.0 (or none for the baseline), are read.
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def _runs(spec: str, batch: int) -> dict[int, float]:
    """{seed: test Recall@1} of the method named after the colon in the CSV before it, at `batch`."""
    path, _, method = spec.rpartition(":")
    if not path or not method:
        raise SystemExit(f"--pair: expected CSV:METHOD, got {spec!r}")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["figure"] == "fig1a" and r["split"] == "test"
                and r["method"] == method and int(r["batch"]) == batch]
    if not rows:
        raise SystemExit(f"{path}: no test fig1a rows of method {method!r} at batch {batch}")
    return {int(r["seed"]): float(r["recall@1"]) for r in rows}


def _cell(values: list[float]) -> str:
    return f"{values[0]:.4f}" if len(values) == 1 else f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.3f}"


def table(pairs: list[tuple[int, str, str]]) -> str:
    """The Markdown table: per batch the two methods' means over the seeds both ran, and the paired gains."""
    out = ["| batch | baseline (its settings) | memory (its settings) | seeds | baseline | memory | gain (points), "
           "per seed |", "|---|---|---|---|---|---|---|"]
    for batch, base_spec, mem_spec in pairs:
        base, mem = _runs(base_spec, batch), _runs(mem_spec, batch)
        seeds = sorted(set(base) & set(mem))
        gains = [100 * (mem[s] - base[s]) for s in seeds]
        per_seed = " / ".join(f"{g:+.1f}" for g in gains)
        out.append(f"| {batch} | {base_spec.rpartition(':')[2]} | {mem_spec.rpartition(':')[2]} | "
                   f"{' '.join(map(str, seeds))} | {_cell([base[s] for s in seeds])} | {_cell([mem[s] for s in seeds])} "
                   f"| **{statistics.fmean(gains):+.1f}** ({per_seed}) |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fair_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=3, action="append", required=True, metavar=("BATCH", "BASELINE", "MEMORY"),
                    help="a batch size, then CSV:METHOD of the baseline and of the memory method")
    ap.add_argument("--out", default=None, help="write the table here (default: print it)")
    args = ap.parse_args(argv)
    text = table([(int(b), base, mem) for b, base, mem in args.pair])
    if args.out:
        from xbmcore.atomic import write_text
        write_text(Path(args.out), text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
