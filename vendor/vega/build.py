"""Build plots.html, the page template `dvc plots show` and `dvc plots diff` fill (see .dvc/config), from the npm
packages of Vega, Vega-Lite and Vega-Embed, inlined so the page draws without a network.

    python vendor/vega/build.py                  # npm pack the pinned versions below, write plots.html + licences
    python vendor/vega/build.py --from DIR       # the same from tarballs already in DIR (vega-5.33.1.tgz, ...)

DVC's own page loads the three libraries from a CDN through its `{scripts}` placeholder: this template has no such
placeholder, so nothing external is loaded. The scripts are inlined rather than linked because DVC writes the page
wherever `-o` (default dvc_plots/) points, where no relative path to this folder would hold; an inlined page can
also be copied off a server and opened anywhere. To upgrade, change VERSIONS and run this again.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# package -> (version, its UMD build). Vega-Lite 5 and Vega-Embed 6 both run on Vega 5; DVC's specs are Vega-Lite 5.
VERSIONS = {
    "vega": ("5.33.1", "build/vega.min.js"),
    "vega-lite": ("5.23.0", "build/vega-lite.min.js"),
    "vega-embed": ("6.29.0", "build/vega-embed.min.js"),
}
# The placeholders dvc_render's HTML.embed replaces by plain string replacement; a library that happened to hold one
# would be corrupted, and one that held "</script" or "<!--" would end or confuse its inline <script> element.
FORBIDDEN = ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script", "<!--")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Built by vendor/vega/build.py: Vega, Vega-Lite and Vega-Embed inlined (BSD-3-Clause; their licences are
         LICENSE.<package> beside the template), so this page draws offline. -->
{scripts}
    <script>
        // DVC calls vegaEmbed('#id', spec) once per plot. Draw SVG instead of the default canvas: sharp at any zoom,
        // and the curves are elements of the page (tests/pipeline/test_offline_plots.py reads them).
        vegaEmbed = (function (embed) {{
            var wrapped = function (el, spec, opt) {{
                return embed(el, spec, Object.assign({{renderer: "svg"}}, opt || {{}}));
            }};
            return Object.assign(wrapped, embed);
        }})(vegaEmbed);
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def npm_pack(dest: Path) -> None:
    specs = [f"{name}@{version}" for name, (version, _) in VERSIONS.items()]
    subprocess.run(["npm", "pack", "--silent", *specs], cwd=dest, check=True, stdout=subprocess.DEVNULL)


def member(tgz: Path, path: str) -> str:
    with tarfile.open(tgz) as tar:
        try:
            return tar.extractfile(f"package/{path}").read().decode("utf-8")
        except (KeyError, AttributeError):  # no such member, or not a regular file
            raise FileNotFoundError(f"{tgz.name} has no package/{path}") from None


def build(src: Path, out: Path) -> None:
    scripts = []
    for name, (version, umd) in VERSIONS.items():
        tgz = src / f"{name}-{version}.tgz"
        if not tgz.is_file():
            raise FileNotFoundError(f"{tgz} is missing: run `npm pack {name}@{version}` in {src}")
        js = member(tgz, umd)
        if bad := [s for s in FORBIDDEN if s in js]:
            raise ValueError(f"{name}@{version} {umd} contains {bad}: it cannot be inlined into the template")
        if json.loads(member(tgz, "package.json"))["version"] != version:
            raise ValueError(f"{tgz.name} does not hold {name}@{version}")
        try:
            (out / f"LICENSE.{name}").write_text(member(tgz, "LICENSE"))
        except FileNotFoundError:
            # The vega package ships none (only package.json's "BSD-3-Clause"): LICENSE.vega is the vega
            # repository's LICENSE at the tag of VERSIONS, committed by hand; upgrading means taking it again.
            if not (out / f"LICENSE.{name}").is_file():
                raise FileNotFoundError(f"{tgz.name} has no LICENSE and {out / f'LICENSE.{name}'} is missing: "
                                        f"take it from the {name} repository at v{version}") from None
        scripts.append(f"    <!-- {name}@{version} {umd} -->\n    <script>{js.strip()}</script>")
    (out / "plots.html").write_text(PAGE.format(scripts="\n".join(scripts)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="src", type=Path, help="a folder holding the npm tarballs (default: npm pack them)")
    args = ap.parse_args(argv)
    if args.src is not None:
        build(args.src, HERE)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            npm_pack(Path(tmp))
            build(Path(tmp), HERE)
    print(f"wrote {HERE / 'plots.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
