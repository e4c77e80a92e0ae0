"""The docs say only what the code does: every command, params override and Python block of README.md and
docs/**/*.md is checked against the real thing (the checker is tests/docs_commands.py).

Commands. Fenced blocks other than Python (bash, console, text, yaml comments...) and inline code spans (which
may run over the lines of their paragraph) are read as shell words: a trailing backslash continues a line, a
`$ ` prompt or a `.venv/bin/` path is no matter, and a command inside a shell comment is a command too (its
bare words are not judged there: prose follows). `python -m X`, `torchrun ... -m X`, `xbm-gui` (gui) and
`make <target> ARGS="..."` (the Makefile recipe's `-m X ... $(ARGS)`) are checked where X's top package is
ours (pipeline, bench, gui, xbmcore); `python -m pytest`, pip, venv, mkdocs, a placeholder module like
`pipeline.<stage>` are not. The parser of X is the one `python -m X` builds: one subprocess runs each module as
__main__ with argparse's `parse_args` replaced by a capture that stops it there (a module whose code builds no
ArgumentParser and calls no main() takes no options and is not run). Every option must be one of the parser's
(a unique prefix is reported as an abbreviation to write out), take a value where the parser says it takes one
and none where it takes none, a value among its choices and of its int/float type; a bare word only where the
parser has positional arguments.

Params overrides. Every `-S/--set KEY=VALUE` (and the parser's other KEY=VALUE options, --baseline-set) of
such a command, of `dvc exp run` (`-S`, `--set-param`), of a span that is only an argument list (`-S
train.lr=3e-5`) or a quoted argument list (REAL="-S ...", a shell variable substituted into the block's later
lines; make's ARGS) is applied to the repo's params.yaml by the real code, xbmcore.config.load_params (its
set_dotted reads the value as YAML, then the pydantic schema), all of a command's overrides together, so an
unknown key, a wrong type or a broken rule across fields fails. Placeholders: a value with `<...>`, `...` or
`$VAR` (not set in the block) stands for the value params.yaml has, so only its key is checked; a key that is
a placeholder (`-S ...`) is skipped, and so is a lone `-S` at the end of a span (prose naming the option).

Python blocks. A ```python block whose last non-blank line before the fence is `<!-- fragment -->` (or
`<!-- fragment: why -->`) is a fragment: it is compiled, never run. A block holding a pymdownx.snippets include
(`--8<-- "examples/x.py"`) is left to the tests that run that file (tests/test_docs_examples.py). Any other
block must run: a subprocess of this interpreter, cwd a fresh temporary folder with a copy of params.yaml,
the project on PYTHONPATH, 120 s at most.

Each problem is a line `<doc>:<line>: <what>`, e.g.
`docs/embedding.md:8: python -m pipeline.embed: no option --foo (options: -h, --help, --model, ...)`. The
self-tests below run the checker on scratch pages with a known mistake and expect exactly that report.
"""
from __future__ import annotations

import re

import pytest

import docs_commands as dc

EMBED = "python -m pipeline.embed"


@pytest.fixture(scope="module")
def pages():
    return {dc.rel(p): p.read_text() for p in dc.doc_pages()}


@pytest.fixture(scope="module")
def specs(pages):
    """The parsers of every module the docs run, and of those the self-tests use: one subprocess."""
    modules = {"pipeline.embed", "pipeline.tune", "pipeline.check_repro", "bench.paper_figures", "gui"}
    for doc, text in pages.items():
        modules |= {c.module for c in dc.doc_commands(doc, text)
                    if c.module and dc.is_ours(c.module) and "<" not in c.module}
    return dc.parsers(modules)


def _embed_options(specs) -> str:
    return dc._options_text(specs["pipeline.embed"]["parser"])


# -------------------------------------------------------------------------------------------- self-tests


SCRATCH = """\
# Scratch

Embed a folder:

```bash
$ .venv/bin/python -m pipeline.embed --model m.pt --images photos/ --out index/ --no-such-flag
python -m pipeline.embed --model m.pt --images photos/ \\
    --out index/ --dtype float64 --batch-size many
python -m pipeline.embed --model m.pt --images p/ --out i/ --strict=yes --dtype
python -m pipeline.embed --model m.pt --images p/ --out i/ extra   # python -m pipeline.embed --bogus then prose
torchrun --nproc-per-node 2 -m pipeline.embed --model m.pt --images p/ --out i/ --nproc-per-node 2
python -m pytest --no-such-pytest-flag
python -m pipeline.no_such_module --x
```

Inline, over two lines: `python -m pipeline.embed --model m.pt --images p/
--out i/ --ou x`, and `python -m pipeline.<stage> --anything`, `python -m pipeline... --anything`.
"""


def test_flags_are_checked_against_the_parser(specs):
    problems = dc.check_doc_commands("docs/scratch.md", SCRATCH, specs)
    options = _embed_options(specs)
    assert "--model" in options and "--strict" in options and "-S, --set" in options
    assert problems == [
        f"docs/scratch.md:6: {EMBED}: no option --no-such-flag (options: {options})",
        f"docs/scratch.md:8: {EMBED}: --dtype float64: not one of its choices (float32, float16)",
        f"docs/scratch.md:8: {EMBED}: --batch-size expects an int, got 'many'",
        f"docs/scratch.md:9: {EMBED}: --strict takes no value (got '--strict=yes')",
        f"docs/scratch.md:9: {EMBED}: --dtype expects a value",
        f"docs/scratch.md:10: {EMBED}: unexpected argument 'extra' ({EMBED} takes no positional arguments)",
        f"docs/scratch.md:10: {EMBED}: no option --bogus (options: {options})",
        f"docs/scratch.md:11: {EMBED}: no option --nproc-per-node (options: {options})",
        "docs/scratch.md:13: python -m pipeline.no_such_module: no module pipeline.no_such_module "
        "(No module named pipeline.no_such_module)",
        f"docs/scratch.md:17: {EMBED}: --ou is an abbreviation of --out: write the option out",
    ]


def test_a_module_is_found_without_its_main_running(specs):
    # the stage entry points build their parser in pipeline.stages.main; the benches in their own main()
    assert specs["pipeline.embed"]["parser"]["prog"] == EMBED
    assert specs["gui"]["parser"]["prog"] == "xbm-gui"
    figures = {s for o in specs["bench.paper_figures"]["parser"]["options"] for s in o["strings"]}
    assert {"--only", "--baseline-set", "-S", "--set", "--params"} <= figures


OVERRIDES = """\
```bash
dvc exp run -S memory.no_such_key=1
python -m pipeline.embed --model m.pt --images p/ --out i/ -S memory.ratio=abc
python -m pipeline.tune -S memory.store=features -S memory.momentum=0 -S memory.sdc_sigma=0
python -m pipeline.tune -S memory.store=features
dvc exp run -S train.nproc=<n> -S ... -S data.root=<your folder> -S nosuch.key=<n>
REAL="-S model.backbone=resnet50 -S train.batch_size=x"
dvc exp run -S data.name=folder $REAL
make check-repro ARGS="-S train.portable=maybe --until pretrain --nope"
python -m bench.paper_figures --method NAME:KEY=VALUE --method m:memory.momentum=0.99,memory.refresh=-1 -S KEY=VALUE
```
The ablation `-S train.lr=3e-5`, or `-S train.lr_schedule=sometimes`; with `bench.paper_figures` and its `-S`.
"""


def test_overrides_are_checked_against_the_schema(specs):
    problems = dc.check_doc_commands("docs/scratch.md", OVERRIDES, specs)
    make = "make check-repro ARGS=... (python -m pipeline.check_repro)"
    tune = "python -m pipeline.tune"
    assert problems == [
        "docs/scratch.md:2: dvc exp run: -S memory.no_such_key=1: memory.no_such_key: unknown key "
        "(check its spelling and section) (got 1)",
        f"docs/scratch.md:3: {EMBED}: -S memory.ratio=abc: memory.ratio: Input should be a valid number, "
        "unable to parse string as a number (got 'abc')",
        f"docs/scratch.md:5: {tune}: -S memory.store=features: memory: store: features keeps the backbone's "
        "features, which the current head embeds at every step; it does not combine with sdc_sigma or momentum "
        "(set them to 0) (got {'store': 'features', 'sdc_sigma': 0.0, 'momentum': 0.999})",
        "docs/scratch.md:6: dvc exp run: -S nosuch.key=<n>: nosuch: unknown key (check its spelling and section) "
        "(got {'key': None})",
        "docs/scratch.md:7: -S: -S train.batch_size=x: train.batch_size: Input should be a valid integer, unable "
        "to parse string as an integer (got 'x')",
        "docs/scratch.md:8: dvc exp run: -S train.batch_size=x: train.batch_size: Input should be a valid integer, "
        "unable to parse string as an integer (got 'x')",
        f"docs/scratch.md:9: {make}: no option --nope (options: "
        f"{dc._options_text(specs['pipeline.check_repro']['parser'])})",
        f"docs/scratch.md:9: {make}: -S train.portable=maybe: train.portable: Input should be a valid boolean, "
        "unable to interpret input (got 'maybe')",
        "docs/scratch.md:10: python -m bench.paper_figures: -S memory.refresh=-1: memory.refresh: Input should be "
        "greater than or equal to 0 (got -1)",
        "docs/scratch.md:12: -S: -S train.lr_schedule=sometimes: train.lr_schedule: Input should be 'constant' "
        "or 'cosine' (got 'sometimes')",
    ]


BLOCKS = """\
Runs:

```python
x = 1
print(undefined_name + x)
```

<!-- fragment: needs a training set -->
```python
memory.enqueue(emb, labels)
```

<!-- fragment -->
```python
def broken(:
```

```python
--8<-- "examples/own_loop.py"
```

```python
import json
print(json.dumps({"ok": True}))
```
"""


def test_python_blocks_run_or_are_fragments():
    assert dc.check_python_blocks("docs/scratch.md", BLOCKS) == [
        "docs/scratch.md:5: python block (line 3) fails: NameError: name 'undefined_name' is not defined "
        "(make it run, or mark it <!-- fragment -->)",
        "docs/scratch.md:15: python fragment (block at line 14) does not compile: invalid syntax",
    ]


def test_a_wrong_flag_in_a_copy_of_a_real_page(pages, specs, tmp_path):
    """A scratch copy of docs/embedding.md with one flag misspelt: exactly that problem is added."""
    text = pages["docs/embedding.md"]
    lines = text.splitlines()
    n = next(k for k, line in enumerate(lines) if EMBED in line and " --out " in line)
    lines[n] = lines[n].replace(" --out ", " --output-dir ", 1)
    scratch = tmp_path / "embedding.md"
    scratch.write_text("\n".join(lines) + "\n")
    before = dc.check_doc_commands("docs/embedding.md", text, specs)
    after = dc.check_doc_commands("docs/embedding.md", scratch.read_text(), specs)
    added = [p for p in after if p not in before]
    assert added[0] == (f"docs/embedding.md:{n + 1}: {EMBED}: no option --output-dir (options: "
                        f"{_embed_options(specs)})")
    assert [p.split(": ", 2)[2] for p in added[1:]] == []


# ------------------------------------------------------------------------------------------- the real docs


def _report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what} (fix the page or the code):\n" + "\n".join(problems)


def test_docs_commands_match_their_parsers_and_the_params_schema(pages, specs):
    problems = [p for doc, text in pages.items() for p in dc.check_doc_commands(doc, text, specs)]
    assert not problems, _report(problems, "commands in the docs that the code refuses")


def test_docs_python_blocks_run_or_are_marked_fragments(pages):
    problems = [p for doc, text in pages.items() if re.search(r"^\s*(```|~~~)\s*(python|py)\b", text, re.M)
                for p in dc.check_python_blocks(doc, text)]
    assert not problems, _report(problems, "Python blocks in the docs that fail")
