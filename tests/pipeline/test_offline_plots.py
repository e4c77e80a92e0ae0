"""`dvc plots show` and `dvc plots diff` draw their curves with the network off: the project's page template
(vendor/vega/plots.html, the default through .dvc/config's plots.html_template) carries Vega, Vega-Lite and
Vega-Embed inlined. Rendered in headless Chromium, on a tiny DVC project with the project's own plot definitions
and a one-line stage that writes known curves."""
from __future__ import annotations

import re
import shutil
import textwrap
from html import unescape
from pathlib import Path

import pytest
import yaml
from dvc_render.html import PAGE_HTML

from headless import DeadProxy, chromium, needs_chromium
from test_dvc_pipeline import dvc, git
from tiny_project import REPO

STEPS = 21  # points per curve
# Chromium's own services, which it calls through the proxy whatever the page holds; any other host is the page's.
BROWSER_HOSTS = re.compile(r"(^|\.)(google\.com|googleapis\.com|gvt1\.com)$")


def curve_plots() -> dict[str, dict]:
    """The project's curve plots (dvc.yaml's top-level `plots`), by id; the image plot needs the evaluate stage."""
    plots = {}
    for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]:
        if isinstance(entry, dict):
            (name, spec), = entry.items()
            plots[name] = {"x": spec["x"], "y": {f: [c] if isinstance(c, str) else c for f, c in spec["y"].items()}}
    return plots


def csv_files() -> dict[str, list[str]]:
    """The columns of each CSV file the curve plots read, x first."""
    files: dict[str, list[str]] = {}
    for spec in curve_plots().values():
        for f, cols in spec["y"].items():
            files.setdefault(f, [spec["x"]])
            files[f] += [c for c in cols if c not in files[f]]
    return files


def project(root: Path) -> Path:
    """A git + DVC project with the repository's .dvc/config, page template and curve plots, and a stage `curves`
    that writes every column those plots read: column j of a file is slope * (j + 1) + step, so each line's first
    point tells its experiment (params.yaml's `slope`) and its field."""
    plots, files = curve_plots(), csv_files()
    (root / "curves.py").write_text(textwrap.dedent(f"""\
        import csv, os, yaml
        slope = yaml.safe_load(open("params.yaml"))["slope"]
        for path, cols in {files!r}.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(cols)
                for step in range({STEPS}):
                    w.writerow([step] + [slope * (j + 1) + step for j in range(len(cols) - 1)])
        """))
    (root / "params.yaml").write_text("slope: 1\n")
    stage = {"cmd": "python curves.py", "params": ["slope"], "outs": [{f: {"cache": False}} for f in files]}
    plots = [{name: spec} for name, spec in plots.items()]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"curves": stage}, "plots": plots}, sort_keys=False))
    (root / ".gitignore").write_text("/dvc_plots/\n/default_page/\n")
    shutil.copytree(REPO / "vendor" / "vega", root / "vendor" / "vega")
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the project's wiring, as committed
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    return root


def render(page: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """The line marks Chromium drew on `page`, by plot id (each: its aria label's fields, its point count), and
    the hosts the page asked for."""
    with DeadProxy() as proxy:
        dom = chromium(page.as_uri(), "--dump-dom", proxy_port=proxy.port).stdout
    hosts = [re.split(r"[ /:]+", r)[1] if r.startswith("CONNECT") else re.split(r"/+", r)[1] for r in proxy.requests]
    lines: dict[str, list[dict]] = {}
    # Vega-Embed fills each plot's <div id="<plot id>">; every drawn series is an SVG path labelled for screen
    # readers ("step: 0; y: 2; rev: exp-a; field: loss").
    for part in re.split(r'(?=<div id="[^"]+" class="vega-embed)', dom)[1:]:
        plot = re.match(r'<div id="([^"]+)"', part).group(1)
        for label, d in re.findall(r'<path aria-label="([^"]*)" role="graphics-symbol" '
                                   r'aria-roledescription="line mark"[^>]*?\sd="([^"]*)"', part):
            fields = dict(kv.split(": ", 1) for kv in unescape(label).split("; "))
            lines.setdefault(plot, []).append({**fields, "points": 1 + d.count("L")})
    return lines, [h for h in hosts if not BROWSER_HOSTS.search(h)]


def first_values(lines: list[dict], x: str) -> dict[tuple[str, str], set[float]]:
    """(rev, field) -> first y of its lines, for lines with every point drawn (the raw and the smoothed layer)."""
    out: dict[tuple[str, str], set[float]] = {}
    for line in lines:
        assert line["points"] == STEPS, line
        assert line[x] == "0", line
        rest = {k: v for k, v in line.items() if k not in (x, "rev", "field", "points")}
        (name, y), = rest.items()  # "y" when a plot has several fields, else the field's own name
        out.setdefault((line["rev"], line.get("field", name)), set()).add(float(y.replace("\u2212", "-")))
    return out


def expected(slopes: dict[str, int]) -> dict[str, dict[tuple[str, str], set[float]]]:
    """The first points the stage wrote, for experiments of these slopes."""
    files = csv_files()
    return {plot: {(rev, col): {float(slope * files[f].index(col))} for rev, slope in slopes.items()
                   for f, cols in spec["y"].items() for col in cols}
            for plot, spec in curve_plots().items()}


@pytest.fixture(scope="module")
def tiny_dvc(tmp_path_factory) -> Path:
    root = project(tmp_path_factory.mktemp("plots"))
    dvc(root, "exp", "run", "-n", "exp-a", "-S", "slope=2")
    dvc(root, "exp", "run", "-n", "exp-b", "-S", "slope=3")  # the workspace now holds exp-b's curves
    return root


def test_the_project_page_template_is_the_default_and_holds_no_external_script():
    cfg = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"^\s*html_template = \.\./vendor/vega/plots\.html$", cfg, re.M)  # relative to .dvc/
    page = (REPO / "vendor" / "vega" / "plots.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN script tags go where {scripts} is
    assert not re.search(r"<script[^>]*\ssrc=", page)
    for pkg in ("vega", "vega-lite", "vega-embed"):
        assert (REPO / "vendor" / "vega" / f"LICENSE.{pkg}").read_text().startswith("Copyright (c)")
        assert f"<!-- {pkg}@" in page


@needs_chromium
def test_dvc_plots_show_draws_every_curve_offline(tiny_dvc, tmp_path):
    out = dvc(tiny_dvc, "plots", "show")  # no flag: the template comes from .dvc/config
    page = tiny_dvc / "dvc_plots" / "index.html"
    assert out.stdout.strip() == page.as_uri()
    lines, hosts = render(page)
    assert hosts == []
    assert set(lines) == set(curve_plots())
    for plot, want in expected({"workspace": 3}).items():
        assert first_values(lines[plot], "step") == want, plot

    # Control: DVC's own page (its CDN scripts), same data, same browser: nothing drawn, the CDN asked for.
    default = tmp_path / "default.html"
    default.write_text(PAGE_HTML)
    dvc(tiny_dvc, "plots", "show", "--html-template", str(default), "-o", "default_page")
    lines, hosts = render(tiny_dvc / "default_page" / "index.html")
    assert lines == {} and "cdn.jsdelivr.net" in hosts


@needs_chromium
def test_dvc_plots_diff_draws_two_experiments_offline(tiny_dvc):
    dvc(tiny_dvc, "plots", "diff", "exp-a", "exp-b")
    lines, hosts = render(tiny_dvc / "dvc_plots" / "index.html")
    assert hosts == []
    for plot, want in expected({"exp-a": 2, "exp-b": 3}).items():
        assert first_values(lines[plot], "step") == want, plot
