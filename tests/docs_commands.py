"""The checker behind tests/test_docs_commands.py: the commands, params overrides and Python blocks of the docs
against the real parsers, the real params schema and a real interpreter. Each check returns problems as lines
`<doc>:<line>: <what>`; an empty list is a page that says only what the code does.

Run as a script (`python tests/docs_commands.py --dump-parsers MODULE...`) it prints the argparse parsers of
the modules as JSON: see `dump_parsers`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
OUR_PACKAGES = ("pipeline", "bench", "gui", "xbmcore")
# Console scripts of pyproject.toml's [project.scripts], as the module `python -m` runs.
CONSOLE_SCRIPTS = {"xbm-gui": "gui"}
PYTHON_LANGS = {"python", "py", "python3"}
FRAGMENT = re.compile(r"^\s*<!--\s*fragment(?::[^>]*)?\s*-->\s*$")
SNIPPET = re.compile(r"^\s*-{1,}8<-{1,}\s")  # pymdownx.snippets: --8<-- "examples/x.py"
PLACEHOLDER = re.compile(r"<[^<>\s]*>|\.\.\.|…|\$\{?[A-Za-z_]")  # <value>, ..., $VAR
LAUNCHER = re.compile(r"^(?:.*/)?(?:python(?:\d(?:\.\d+)?)?|torchrun)$")
SEPARATOR = re.compile(r"^[;&|()]+$")
REDIRECT = re.compile(r"^\d*(?:[<>]{1,2}|&>)")
MODULE = re.compile(r"^[A-Za-z_][\w]*(?:\.[A-Za-z_<>][\w<>]*)*$")


# --------------------------------------------------------------------------------------------------- Markdown


@dataclass
class Block:
    """A fenced code block: `lines` are (line number, text without the fence's indentation)."""

    lang: str
    fence_line: int
    lines: list[tuple[int, str]]
    fragment: bool


@dataclass
class Span:
    """An inline code span; a span may run over the lines of its paragraph, one (line, text) each."""

    lines: list[tuple[int, str]]


def parse_markdown(text: str) -> tuple[list[Block], list[Span]]:
    """The fenced blocks (``` or ~~~, indented in lists and admonitions too) and the inline code spans outside
    them."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$", lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        info = m["info"].strip().lstrip("{").lstrip(".")
        lang = re.split(r"[\s{}]", info, maxsplit=1)[0].lower() if info else ""
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body: list[tuple[int, str]] = []
        j = i + 1
        while j < len(lines):
            close = re.match(r"^[ \t]*(`{3,}|~{3,})\s*$", lines[j])
            if close and close[1][0] == fence[0] and len(close[1]) >= len(fence):
                break
            line = lines[j]
            body.append((j + 1, line[indent:] if line[:indent].strip() == "" else line.lstrip()))
            j += 1
        blocks.append(Block(lang, i + 1, body, bool(FRAGMENT.match(before))))
        prose.append((i + 1, ""))  # a block ends a paragraph
        i = j + 1
    return blocks, _spans(prose)


def _spans(prose: list[tuple[int, str]]) -> list[Span]:
    spans: list[Span] = []
    para: list[tuple[int, str]] = []
    for lineno, line in [*prose, (0, "")]:
        if line.strip():
            para.append((lineno, line))
            continue
        if para:
            joined = "\n".join(t for _, t in para)
            starts = [0]
            for _, t in para[:-1]:
                starts.append(starts[-1] + len(t) + 1)
            for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", joined, re.S):
                begin = m.start(2)
                first = max(k for k, s in enumerate(starts) if s <= begin)
                parts = m[2].split("\n")
                spans.append(Span([(para[first + k][0], p) for k, p in enumerate(parts)]))
        para = []
    return spans


# ---------------------------------------------------------------------------------------------- shell words


@dataclass
class Tok:
    text: str
    line: int
    comment: bool = False  # the words of a shell comment: prose may follow a command there


def _split_comment(text: str) -> tuple[str, str | None]:
    quote = None
    for k, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or text[k - 1].isspace()):
            return text[:k], text[k + 1:]
    return text, None


def _words(text: str) -> list[str]:
    # a placeholder with spaces (<your folder>) is one word
    text = re.sub(r"<([A-Za-z][^<>\n]*?)>", lambda m: "<" + m[1].replace(" ", "_") + ">", text)
    lx = shlex.shlex(text, posix=True, punctuation_chars=";&|()")
    lx.whitespace_split = True
    lx.commenters = ""
    try:
        return list(lx)
    except ValueError:  # an apostrophe in prose: plain words
        return text.split()


def tokenize(lines: list[tuple[int, str]]) -> list[Tok]:
    """Shell words of (line, text) pieces, each word with its line; a shell comment's words come after the
    line's own, marked, behind a `;` so that a command in the comment is a command of its own."""
    out: list[Tok] = []
    for lineno, text in lines:
        code, rest = _split_comment(text)
        out += [Tok(w, lineno) for w in _words(code)]
        if rest is not None:
            out.append(Tok(";", lineno, True))
            out += [Tok(w, lineno, True) for w in _words(rest)]
            out.append(Tok(";", lineno, True))
    return out


def logical_lines(block_lines: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """Lines joined over a trailing backslash, each a list of its physical (line, text) pieces."""
    out: list[list[tuple[int, str]]] = []
    cur: list[tuple[int, str]] = []
    for lineno, text in block_lines:
        if text.rstrip().endswith("\\"):
            cur.append((lineno, text.rstrip()[:-1]))
            continue
        cur.append((lineno, text))
        out.append(cur)
        cur = []
    if cur:
        out.append(cur)
    return out


# ------------------------------------------------------------------------------------------------- commands


@dataclass
class Command:
    """One command of a page: `python -m <module> args` (module None: a bare argument list such as a span
    `-S train.lr=3e-5`, or `dvc exp run`, whose only checked arguments are its -S overrides)."""

    doc: str
    line: int
    name: str  # as a problem names it: "python -m pipeline.embed", "dvc exp run", "-S"
    module: str | None
    args: list[Tok]
    in_comment: bool = False


def _simple_commands(toks: list[Tok]) -> list[list[Tok]]:
    out, cur = [], []
    for t in toks:
        if SEPARATOR.match(t.text) or REDIRECT.match(t.text):
            if cur:
                out.append(cur)
            cur = []
            if REDIRECT.match(t.text):  # the redirection's target is no argument
                cur = [Tok(";", t.line)]
            continue
        cur.append(t)
    if cur:
        out.append(cur)
    return [[t for t in c if t.text != ";"] for c in out if any(t.text != ";" for t in c)]


def _module_name(token: str, in_comment: bool) -> str:
    """The module of `-m <token>`: a comment's punctuation dropped; "" for an elided one (pipeline..., x.<y>)."""
    token = token.rstrip(":;,)")
    if token.endswith(("...", "…")):
        return ""
    return token.rstrip(".") if in_comment else token


@lru_cache(maxsize=1)
def _make_recipes() -> dict[str, list[str]]:
    recipes: dict[str, list[str]] = {}
    target = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if m := re.match(r"^([\w.-]+):(?!=)", line):
            target = m[1]
            recipes[target] = []
        elif line.startswith("\t") and target:
            recipes[target].append(line.strip())
        elif line.strip() and not line.startswith("#"):
            target = None
    return recipes


def find_commands(doc: str, units: list[list[Tok]]) -> list[Command]:
    """The commands in token lists (one per logical line of a block, or per inline span)."""
    out: list[Command] = []
    for toks in units:
        for cmd in _simple_commands(toks):
            out += _commands_of(doc, cmd)
    return out


def _commands_of(doc: str, cmd: list[Tok]) -> list[Command]:
    out: list[Command] = []
    texts = [t.text for t in cmd]
    # a quoted argument that is itself a command line or an argument list: "$(python -m x)", REAL="-S ...",
    # ARGS="-S ..."; it is seen again as a line of its own
    for t in cmd if texts[0] != "make" else []:
        inner = t.text.split("=", 1)[1] if re.match(r"^[A-Za-z_]\w*=", t.text) else t.text
        if re.search(r"\s", inner):
            inner = inner.removeprefix("$(").removesuffix(")")
            out += find_commands(doc, [[Tok(w, t.line, t.comment) for w in _words(inner)]])
    for k, t in enumerate(cmd):
        if LAUNCHER.match(t.text):
            for j in range(k + 1, len(cmd) - 1):
                if cmd[j].text == "-m":
                    mod = _module_name(cmd[j + 1].text, cmd[j + 1].comment)
                    if MODULE.match(mod):
                        out.append(Command(doc, t.line, f"python -m {mod}", mod, cmd[j + 2:], t.comment))
                    break
                if not cmd[j].text.startswith("-") and cmd[j].text.endswith(".py"):
                    break  # python script.py: not a module
            return out
        if (script := t.text.rsplit("/", 1)[-1]) in CONSOLE_SCRIPTS:
            return out + [Command(doc, t.line, script, CONSOLE_SCRIPTS[script], cmd[k + 1:], t.comment)]
        if t.text.rsplit("/", 1)[-1] == "dvc" and texts[k + 1:k + 3] == ["exp", "run"]:
            return out + [Command(doc, t.line, "dvc exp run", None, cmd[k + 3:], t.comment)]
    if texts[0] == "make":
        targets = [x for x in texts[1:] if not x.startswith("-") and "=" not in x]
        make_args = [x.split("=", 1)[1] for x in texts[1:] if x.startswith("ARGS=")]
        for target in targets:
            for recipe in _make_recipes().get(target, []):
                m = re.search(r"\s-m\s+([\w.]+)\s.*\$\(ARGS\)", recipe)
                if m and make_args:
                    args = [Tok(w, cmd[0].line, cmd[0].comment) for w in _words(make_args[-1])]
                    out.append(Command(doc, cmd[0].line, f"make {target} ARGS=... (python -m {m[1]})", m[1], args,
                                       cmd[0].comment))
        return out
    if texts[0] in ("-S", "--set", "--set-param") or re.match(r"^-S\S", texts[0]):
        out.append(Command(doc, cmd[0].line, "-S", None, cmd, cmd[0].comment))
    return out


def _substitute(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: env.get(m[1], m[0]), text)


def doc_commands(doc: str, text: str) -> list[Command]:
    """Every command of a page: in its fenced blocks other than Python (shell variables that a block assigns,
    REAL="-S ...", are substituted in its later lines) and in its inline code spans."""
    blocks, spans = parse_markdown(text)
    units: list[list[Tok]] = []
    for block in blocks:
        if block.lang in PYTHON_LANGS:
            continue
        env: dict[str, str] = {}
        for logical in logical_lines(block.lines):
            logical = [(n, _substitute(t, env)) for n, t in logical]
            toks = tokenize(logical)
            code = [t for t in toks if not t.comment]
            if len(code) == 1 and (m := re.match(r"^([A-Za-z_]\w*)=(.*)$", code[0].text, re.S)):
                env[m[1]] = m[2]
            units.append(toks)
    units += [tokenize(span.lines) for span in spans]
    return find_commands(doc, units)


# ---------------------------------------------------------------------------------------------- the parsers


def dump_parsers(modules: list[str]) -> dict[str, dict]:
    """Each module's argparse parser as JSON-able data, the parser that `python -m <module>` builds: the module
    is run as __main__ (runpy) with argparse's parse_args replaced by a capture that stops it there, so its
    main runs only up to its parsing (nothing is trained). The portable switch's re-exec is disabled. A module
    that never parses (it takes no options) has "parser": None; one that cannot be imported, "error"."""
    import contextlib
    import io
    import runpy
    import signal

    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from xbmcore import portable

    portable.enter = lambda *a, **k: False  # no os.execv of this process

    class Captured(Exception):
        pass

    seen: list[argparse.ArgumentParser] = []

    def too_late(*_):
        raise TimeoutError("it did not reach its argument parsing within 30 s")

    signal.signal(signal.SIGALRM, too_late)

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise Captured

    argparse.ArgumentParser.parse_args = capture
    out: dict[str, dict] = {}
    for mod in modules:
        seen.clear()
        try:
            source = _main_source(mod)
        except ImportError as err:
            out[mod] = {"error": f"no module {mod} ({err})"}
            continue
        if "ArgumentParser" not in source and not re.search(r"\bmain\(", source):
            # neither builds a parser nor calls a main that would: running it would do its whole work (a
            # benchmark that runs at import); it takes no options
            out[mod] = {"parser": None}
            continue
        signal.alarm(30)  # a main that works before it parses is stopped, and reported
        saved = sys.argv
        sys.argv = [mod]
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                runpy.run_module(mod, run_name="__main__", alter_sys=False)
            out[mod] = {"parser": None}
        except Captured:
            out[mod] = {"parser": _describe(seen[-1])}
        except SystemExit:
            out[mod] = {"parser": None}
        except ImportError as err:
            out[mod] = {"error": f"cannot import {mod}: {err}"}
        except Exception as err:  # noqa: BLE001 - reported as the module's problem
            out[mod] = {"error": f"{mod} fails before it parses its arguments: {type(err).__name__}: {err}"}
        finally:
            signal.alarm(0)
            sys.argv = saved
    return out


def _main_source(mod: str) -> str:
    """The source `python -m mod` runs (a package's __main__.py), found without running it."""
    import importlib.util

    spec = importlib.util.find_spec(mod)
    if spec is None or spec.origin is None:
        raise ImportError(f"No module named {mod}")
    if spec.submodule_search_locations:  # a package: its __main__
        spec = importlib.util.find_spec(mod + ".__main__")
        if spec is None or spec.origin is None:
            raise ImportError(f"{mod} is a package without __main__")
    return Path(spec.origin).read_text()


def _describe(ap: argparse.ArgumentParser) -> dict:
    options, positionals = [], []
    for a in ap._actions:
        nargs = a.nargs
        if nargs is None:
            nargs = 1
        elif nargs == argparse.SUPPRESS:
            nargs = 0
        typ = {int: "int", float: "float"}.get(a.type)
        choices = None
        if a.choices is not None:
            try:
                choices = json.loads(json.dumps(list(a.choices)))
            except TypeError:
                choices = [str(c) for c in a.choices]
        rec = {"strings": list(a.option_strings), "nargs": nargs, "type": typ, "choices": choices,
               "metavar": a.metavar if isinstance(a.metavar, str) else None, "dest": a.dest,
               "suppressed": a.help == argparse.SUPPRESS}
        (options if a.option_strings else positionals).append(rec)
    return {"prog": ap.prog, "options": options, "positionals": positionals, "allow_abbrev": ap.allow_abbrev,
            "prefix_chars": ap.prefix_chars}


@lru_cache(maxsize=None)
def _parsers_cached(modules: tuple[str, ...]) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--dump-parsers", *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen", "MPLBACKEND": "Agg"})
    if proc.returncode:
        raise RuntimeError(f"dumping the parsers failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parsers(modules) -> dict[str, dict]:
    """The parsers of our modules, from one subprocess (torch and the rest imported once for all of them)."""
    return _parsers_cached(tuple(sorted(set(modules))))


def is_ours(module: str) -> bool:
    return module.split(".")[0] in OUR_PACKAGES


# ----------------------------------------------------------------------------------------- the flag checks


def _is_value(tok: str) -> bool:
    return not tok.startswith("-") or tok == "-" or bool(re.match(r"^-\d", tok)) or PLACEHOLDER.fullmatch(tok)


def _options_text(spec: dict) -> str:
    return ", ".join(s for o in spec["options"] if not o["suppressed"] for s in o["strings"])


@dataclass
class ArgCheck:
    problems: list[tuple[int, str]] = field(default_factory=list)
    overrides: dict[str, list[Tok]] = field(default_factory=dict)  # option dest -> KEY=VALUE words
    methods: list[list[Tok]] = field(default_factory=list)  # each --method NAME:KEY=VALUE,...'s overrides


def check_args(cmd: Command, spec: dict) -> ArgCheck:
    """The command's words against its parser: every option one of the parser's, given a value where it takes
    one (and none where it takes none), a value among its choices and of its type (int, float) where the
    parser says; a bare word only where the parser takes positional arguments. Placeholders (<x>, ..., $VAR)
    pass as values. The KEY=VALUE values (-S, --set, --baseline-set: options whose metavar is KEY=VALUE) are
    collected for the params check."""
    res = ArgCheck()
    byname = {s: o for o in spec["options"] for s in o["strings"]}
    takes_positionals = bool(spec["positionals"])
    args = cmd.args
    k = 0

    def bad(tok: Tok, what: str):
        res.problems.append((tok.line, what))

    while k < len(args):
        tok = args[k]
        text = tok.text
        k += 1
        if text == "--":
            break
        if _is_value(text):
            if not (takes_positionals or cmd.in_comment or tok.comment or PLACEHOLDER.search(text)):
                bad(tok, f"unexpected argument {text!r} ({spec['prog']} takes no positional arguments)")
            continue
        name, attached = text, None
        if text.startswith("--") and "=" in text:
            name, attached = text.split("=", 1)
        elif not text.startswith("--") and len(text) > 2 and text[:2] in byname:
            name, attached = text[:2], text[2:]
        opt = byname.get(name)
        if opt is None:
            matches = sorted({s for s in byname if s.startswith("--") and s.startswith(name)}) \
                if name.startswith("--") and spec["allow_abbrev"] else []
            if len(matches) == 1:
                bad(tok, f"{name} is an abbreviation of {matches[0]}: write the option out")
                opt = byname[matches[0]]
            else:
                bad(tok, f"no option {name} (options: {_options_text(spec)})")
                while k < len(args) and _is_value(args[k].text) and args[k].text != "--":
                    k += 1  # its values, if it takes any: not judged
                continue
        nargs = opt["nargs"]
        values: list[Tok] = []
        if attached is not None:
            if nargs == 0:
                bad(tok, f"{name} takes no value (got {text!r})")
                continue
            values.append(Tok(attached, tok.line, tok.comment))
        want_min, want_max = {0: (0, 0), "?": (0, 1), "*": (0, None), "+": (1, None),
                              "...": (0, None), "A...": (1, None)}.get(nargs, (nargs, nargs))
        while (want_max is None or len(values) < want_max) and k < len(args) and _is_value(args[k].text) \
                and args[k].text != "--":
            if cmd.in_comment and nargs in ("*", "+") and len(values) >= 1:
                break
            values.append(args[k])
            k += 1
        if len(values) < want_min:
            bad(tok, f"{name} expects {'a value' if want_min == 1 else f'{want_min} values'}"
                     f"{' (' + opt['metavar'] + ')' if opt['metavar'] else ''}")
            continue
        for v in values:
            if PLACEHOLDER.search(v.text):
                continue
            value = v.text
            if opt["type"] in ("int", "float"):
                try:
                    value = int(value) if opt["type"] == "int" else float(value)
                except ValueError:
                    bad(v, f"{name} expects an {opt['type']}, got {v.text!r}")
                    continue
            if opt["choices"] is not None and value not in opt["choices"] and str(value) not in map(str, opt["choices"]):
                bad(v, f"{name} {v.text}: not one of its choices ({', '.join(map(str, opt['choices']))})")
        if opt["metavar"] == "KEY=VALUE":
            res.overrides.setdefault(opt["dest"], []).extend(values)
        elif opt["metavar"] == "NAME[:KEY=VALUE,...]":  # --method name:memory.momentum=0.99,memory.refresh=8
            for v in values:
                _, _, items = v.text.partition(":")
                res.methods.append([Tok(o, v.line, v.comment) for o in items.split(",") if o])
    return res


def _bare_overrides(args: list[Tok]) -> tuple[list[Tok], list[tuple[int, str]]]:
    """-S/--set/--set-param KEY=VALUE words of a command whose parser is not ours (dvc exp run, a span)."""
    out: list[Tok] = []
    problems: list[tuple[int, str]] = []
    k = 0
    while k < len(args):
        t = args[k].text
        if t in ("-S", "--set", "--set-param"):
            if k + 1 < len(args):
                out.append(args[k + 1])
                k += 2
                continue
            # else a bare -S at the end: prose naming the option (`its -S overrides`)
        elif t.startswith("-S") and len(t) > 2:
            out.append(Tok(t[2:], args[k].line, args[k].comment))
        elif t.startswith(("--set=", "--set-param=")):
            out.append(Tok(t.split("=", 1)[1], args[k].line, args[k].comment))
        k += 1
    return out, problems


# ------------------------------------------------------------------------------------------ the params check


@lru_cache(maxsize=1)
def _current_flat() -> dict:
    sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None
    from xbmcore.config import load_params

    return load_params(PARAMS).flat()


def check_overrides(words: list[Tok]) -> list[tuple[int, str]]:
    """KEY=VALUE overrides of one command, applied to the repo's params.yaml by the real code
    (xbmcore.config.load_params: set_dotted, the value read as YAML, then the schema), all together, so a
    rule across fields sees the command's other overrides. A placeholder value (<n>, ..., $VAR) is replaced by
    the key's value in params.yaml, so that the key alone is checked; a key that is a placeholder (-S ...)
    is skipped. Each error is reported at the override it names (its key, a section it sits in, or a field of a
    rule across fields); one that names none of them at every override of the command."""
    sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None
    import yaml

    from xbmcore.config import ParamsError, load_params, set_dotted

    problems: list[tuple[int, str]] = []
    applied: list[tuple[Tok, str, str]] = []  # (word, key, assignment)
    for w in words:
        text = w.text
        key = text.split("=", 1)[0].strip()
        if PLACEHOLDER.search(key) or not key or key.isupper():  # -S ..., -S <key>=..., --method NAME:KEY=VALUE
            continue
        assignment = text
        if "=" in text and PLACEHOLDER.search(text.split("=", 1)[1]):
            value = _current_flat().get(key)
            assignment = f"{key}={json.dumps(value)}"
        try:
            set_dotted(yaml.safe_load(PARAMS.read_text()), assignment)
        except ParamsError as err:
            problems.append((w.line, f"-S {text}: {err}"))
            continue
        applied.append((w, key, assignment))
    if not applied:
        return problems
    try:
        load_params(PARAMS, [a for _, _, a in applied])
    except ParamsError as err:
        for e in err.errors:
            names = set(e.keys())
            hit = [(w, key) for w, key, _ in applied
                   if key in names or any(n.startswith(key + ".") for n in names)
                   or (not e.fields and key.startswith(e.path + "."))]
            for w, _ in hit or [(w, k) for w, k, _ in applied]:
                problems.append((w.line, f"-S {w.text}: {e}"))
    except ValueError as err:
        problems += [(w.line, f"-S {w.text}: {err}") for w, _, _ in applied]
    return problems


# ------------------------------------------------------------------------------------------------ the checks


def check_doc_commands(doc: str, text: str, specs: dict[str, dict] | None = None) -> list[str]:
    """Problems of a page's commands: the options of `python -m <ours>` (and xbm-gui, torchrun -m, make's
    ARGS) against the module's parser, and every -S override against the params schema."""
    commands = doc_commands(doc, text)
    needed = {c.module for c in commands if c.module and is_ours(c.module) and "<" not in c.module}
    if missing := needed - set(specs or {}):
        specs = {**(specs or {}), **parsers(missing)}
    problems: list[tuple[int, str]] = []
    for cmd in commands:
        if cmd.module is None:
            words, ps = _bare_overrides(cmd.args)
            problems += [(n, f"{cmd.name}: {p}") for n, p in ps + check_overrides(words)]
            continue
        if not is_ours(cmd.module) or "<" in cmd.module:
            continue  # not ours (pytest, pip, venv), or a placeholder (pipeline.<stage>)
        spec = specs[cmd.module]
        if "error" in spec:
            problems.append((cmd.line, f"{cmd.name}: {spec['error']}"))
            continue
        if spec["parser"] is None:
            problems += [(t.line, f"{cmd.name}: takes no options (got {t.text})")
                         for t in cmd.args if t.text.startswith("-") and not cmd.in_comment]
            continue
        res = check_args(cmd, spec["parser"])
        problems += [(n, f"{cmd.name}: {p}") for n, p in res.problems]
        base = res.overrides.get("overrides", [])
        groups = [base] + [base + v for d, v in res.overrides.items() if d != "overrides"] \
            + [base + m for m in res.methods]
        seen: set[tuple[int, str]] = set()
        for group in groups:
            for n, p in check_overrides(group):
                if (n, p) not in seen:
                    seen.add((n, p))
                    problems.append((n, f"{cmd.name}: {p}"))
    return [f"{doc}:{n}: {p}" for n, p in sorted(problems, key=lambda x: x[0])]


def check_python_blocks(doc: str, text: str, timeout: float = 120) -> list[str]:
    """Every ```python block runs (a subprocess of this interpreter, in a fresh temporary folder holding a copy of
    params.yaml, the project on PYTHONPATH) without error, or is marked a fragment: `<!-- fragment -->` (or
    `<!-- fragment: why -->`) as the last non-blank line before its fence, and then only compiles. A block
    that is a pymdownx.snippets include (`--8<-- "examples/x.py"`) is left to the tests that run that file."""
    blocks = [b for b in parse_markdown(text)[0] if b.lang in PYTHON_LANGS]
    problems: list[str] = []
    running = []
    for b in blocks:
        code = "\n".join(t for _, t in b.lines) + "\n"
        if any(SNIPPET.match(t) for _, t in b.lines):
            continue
        if b.fragment:
            try:
                compile(code, f"{doc}:{b.fence_line}", "exec")
            except SyntaxError as err:
                line = b.fence_line + (err.lineno or 1)
                problems.append(f"{doc}:{line}: python fragment (block at line {b.fence_line}) does not compile: "
                                f"{err.msg}")
            continue
        tmp = tempfile.TemporaryDirectory(prefix="docs-block-")
        (Path(tmp.name) / "params.yaml").write_text(PARAMS.read_text())
        script = Path(tmp.name) / "block.py"
        script.write_text(code)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "QT_QPA_PLATFORM": "offscreen", "MPLBACKEND": "Agg"}
        proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp.name, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        running.append((b, proc, tmp))
    for b, proc, tmp in running:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            problems.append(f"{doc}:{b.fence_line}: python block (line {b.fence_line}) did not finish in {timeout:.0f} s;"
                            f" mark it <!-- fragment --> if it is not meant to run")
            tmp.cleanup()
            continue
        tmp.cleanup()
        if proc.returncode:
            frames = re.findall(r'File "[^"]*block\.py", line (\d+)', err)
            line = b.fence_line + int(frames[-1]) if frames else b.fence_line
            last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), f"exit {proc.returncode}")
            problems.append(f"{doc}:{line}: python block (line {b.fence_line}) fails: {last.strip()}"
                            f" (make it run, or mark it <!-- fragment -->)")
    return sorted(problems, key=lambda p: int(p.split(":")[1]))


def doc_pages() -> list[Path]:
    """README.md and every Markdown page under docs/ (the generated tables included)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


if __name__ == "__main__":
    if sys.argv[1:2] != ["--dump-parsers"]:
        sys.exit("usage: python tests/docs_commands.py --dump-parsers MODULE...")
    result = dump_parsers(sys.argv[2:])
    sys.stdout.write("\n" + json.dumps(result) + "\n")
