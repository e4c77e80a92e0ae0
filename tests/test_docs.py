"""The documentation site and the README: the site builds strictly (a broken link or anchor, a missing page or an
API symbol that no longer exists fails), the README stays one screen or two with links that resolve, and the
figures the docs quote are the committed ones."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# Markdown links and images: [text](target) and ![alt](target); a target with a scheme is not ours to check.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    # cwd = the project root: pymdownx.snippets reads the generated tables relative to it (base_path: docs).
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The API pages hold the library's own symbols, rendered from the docstrings.
    memory = (site / "api" / "memory" / "index.html").read_text()
    assert "CrossBatchMemory" in memory and "from_ratio" in memory
    # The generated tables are included, not left as snippet markers.
    results = (site / "results" / "index.html").read_text()
    assert "--8&lt;--" not in results and "--8<--" not in results
    fig1a = (DOCS / "paper_figures" / "tables.md").read_text().splitlines()[4]  # Fig. 1a's first row
    assert fig1a.split("|")[3].strip() in results
    serve = (site / "embedding" / "index.html").read_text()
    assert "hostile stream" in serve and "--8&lt;--" not in serve


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.encode()) <= 10 * 1024, f"README.md is {len(text.encode())} bytes; move the detail to docs/"
    links = _relative_links(text)
    assert links, "the README links to the documentation pages"
    nav = (ROOT / "mkdocs.yml").read_text()
    for target in links:
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_file(), f"README.md links to {target}, which does not exist"
        if path.suffix == ".md" and path.parent != ROOT:  # a page (not CHANGELOG.md): it must be in the site too
            assert path.is_relative_to(DOCS), target
            assert str(path.relative_to(DOCS)) in nav, f"{target} is not in mkdocs.yml's nav"


def test_every_xbmcore_module_has_an_api_page():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts)
               for p in (ROOT / "xbmcore").rglob("*.py") if not p.name.startswith("_")}
    modules |= {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "xbmcore").rglob("__init__.py")}
    modules.discard("xbmcore")  # the package's page is the API index
    documented = {m for page in (DOCS / "api").glob("*.md")
                  for m in re.findall(r"^::: (\S+)", page.read_text(), flags=re.M)}
    assert modules - documented == set(), "modules without an API page (docs/api/<module>.md, mkdocs.yml's nav)"
    assert documented - modules == set(), "API pages of modules that no longer exist"


def test_quoted_figures_are_the_committed_ones():
    """The README and the pages quote `make run`'s test metrics and Fig. 1a's table: the same numbers as the
    committed metrics.json and the generated docs/fresh_memory/tables.md (each number of a README row in the
    generated row of its batch)."""
    test = json.loads((ROOT / "metrics.json").read_text())["test"]
    row = "| test | " + " | ".join(f"{test[k]:.4f}" for k in
                                     ("recall@1", "recall@10", "recall@100", "map@r", "r_precision", "nmi")) + " |"
    for page in (README, DOCS / "index.md", DOCS / "results.md"):
        assert row in page.read_text(), f"{page.name} does not quote metrics.json's test row {row}"
    tables = (DOCS / "fresh_memory" / "tables.md").read_text().splitlines()
    fig1a = [line for line in README.read_text().splitlines() if re.match(r"\| \d+ \| 0\.\d{4}", line)]
    assert [line.split("|")[1].strip() for line in fig1a] == ["16", "32", "64", "128", "256"]
    for line in fig1a:
        generated = next(g for g in tables if g.startswith(f"| {line.split('|')[1].strip()} | "))
        numbers = re.findall(r"[+-]?\d+\.\d+(?: ± \d\.\d+)?", line)
        assert len(numbers) >= 4 and all(n in generated for n in numbers), (line, generated)


def test_selection_table_matches_its_runs():
    """The validation grid that chose the learning rates (docs/results.md) against the runs in docs/selection/."""
    runs = {}
    for path in (DOCS / "selection").glob("*.csv"):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                runs[(float(r["warmup_lr"]), float(r["lr"]), r["memory"] == "True")] = float(r["recall@1"])
    text = (DOCS / "results.md").read_text()
    rows = re.findall(r"^\| ([\d.e-]+) \| ([\d.e-]+) \| \**([\d.]+)\** \| \**([\d.]+)\** \| ([+-][\d.]+) \|$",
                      text, flags=re.M)
    assert len(rows) == 7
    for warm, lr, off, on, gain in rows:
        key = (float(warm), float(lr))
        assert runs[(*key, False)] == float(off) and runs[(*key, True)] == float(on), key
        assert f"{100 * (float(on) - float(off)):+.1f}" == gain, key


def test_paper_figure_tables_are_generated(tmp_path):
    """docs/paper_figures/tables.md (the earlier figures: plain XBM, 1,000 steps, the defaults of their time) and
    docs/fresh_memory/tables.md are what bench.paper_figures writes from the committed results (no training)."""
    pytest.importorskip("matplotlib")
    earlier = ["-S", "train.xbm_steps=1000", "-S", "memory.momentum=0"]
    fresh = ["--only", "fig1a", "fig1b", "--batches", "16", "32", "64", "128", "256", "--xbm-steps", "3000",
             "--same-images", "--scale-momentum", "--eval-every", "300", "--ratios", "0.01", "1.0",
             "--cost", str(DOCS / "selection" / "freshness" / "cost.json")]
    long = ["--only", "fig1a", "fig1b", "--batches", "16", "--xbm-steps", "6000", "--eval-every", "300",
            "--ratios", "0.01", "1.0"]
    selection = ["--split", "val", "--batches", "16", "256", "--xbm-steps", "6000", "--same-images", "--eval-every",
                 "300", "--cost", str(DOCS / "selection" / "freshness" / "cost.json")]
    ms = ["--only", "fig1a", "--batches", "16", "64", "--xbm-steps", "3000", "--same-images", "--eval-every", "300",
          "-S", "loss.name=multi_similarity"]
    for folder, args in (("paper_figures", earlier), ("fresh_memory", fresh), ("fresh_memory_long", long),
                         ("selection/freshness", selection), ("fresh_memory_ms", ms)):
        out = tmp_path / f"{folder.replace('/', '_')}.md"
        proc = subprocess.run([sys.executable, "-m", "bench.paper_figures", "--plot", "--out", str(DOCS / folder),
                               "--docs", str(tmp_path), "--markdown-out", str(out), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert out.read_text() == (DOCS / folder / "tables.md").read_text(), \
            f"regenerate: python -m bench.paper_figures --plot --out docs/{folder} " \
            f"--markdown-out docs/{folder}/tables.md {' '.join(args)}"


FAIR = ["--pair", "16", "docs/fresh_memory_fair/results.csv:baseline per-kind",
        "docs/fresh_memory_long/results.csv:momentum0.999",
        "--pair", "256", "docs/fresh_memory_fair/results.csv:baseline per-kind",
        "docs/fresh_memory_fair/results.csv:momentum0.999 per-kind"]


def test_fair_table_is_generated(tmp_path, monkeypatch):
    """docs/fresh_memory_fair/fair.md is what bench.fair_table writes from the committed CSVs, and its gains are
    the paired differences of the CSVs' rows."""
    from bench import fair_table

    monkeypatch.chdir(ROOT)
    out = tmp_path / "fair.md"
    assert fair_table.main([*FAIR, "--out", str(out)]) == 0
    assert out.read_text() == (DOCS / "fresh_memory_fair" / "fair.md").read_text(), \
        f"regenerate: python -m bench.fair_table {' '.join(repr(a) for a in FAIR)} --out docs/fresh_memory_fair/fair.md"
    with open(DOCS / "fresh_memory_fair" / "results.csv", newline="") as f:
        base = {int(r["seed"]): float(r["recall@1"]) for r in csv.DictReader(f)
                if r["method"] == "baseline per-kind" and r["batch"] == "256" and r["split"] == "test"}
    with open(DOCS / "fresh_memory_fair" / "results.csv", newline="") as f:
        mem = {int(r["seed"]): float(r["recall@1"]) for r in csv.DictReader(f)
               if r["method"] == "momentum0.999 per-kind" and r["batch"] == "256" and r["split"] == "test"}
    row = next(line for line in out.read_text().splitlines() if line.startswith("| 256 |"))
    gains = [f"{100 * (mem[s] - base[s]):+.1f}" for s in sorted(set(base) & set(mem))]
    assert row.endswith(f"({' / '.join(gains)}) |"), row
