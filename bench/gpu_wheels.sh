#!/usr/bin/env bash
# Download, here, the wheels that xbmcore needs on a GPU machine without a package registry, into .whl/ at the
# repository root (kept out of git), and check that they install together for that machine's Python.
#
#     bash bench/gpu_wheels.sh
#
# The machine (Python 3.12, x86-64 Linux) already has torch, torchvision, numpy, pillow, scikit-learn, pyyaml,
# tqdm, threadpoolctl and packaging; it lacks pydantic (the params schema) and faiss (the CPU evaluation). The
# pins are the versions the test suite runs with; pydantic 2.14 needs typing-extensions >= 4.16, newer than such
# an image may hold, so it travels too (a newer typing-extensions is a drop-in for an older one). mlflow, dvc and
# optuna are not needed: the benchmark trains through the library, not the pipeline's stages.
#
# Then, on that machine, from the repository root (with .whl carried along):
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#         .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 -m bench.gpu --out $OUT/gpu.json
set -euo pipefail

PY=${PY:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/.whl"
TARGET_PYTHON=3.12
WHEELS=(
    "pydantic==2.14.4"
    "pydantic-core==2.50.5"
    "annotated-types==0.8.0"
    "typing-inspection==0.4.5"
    "typing-extensions==4.16.0"
    "faiss-cpu==1.15.1"
)
# Already on the machine: what the wheels may require without carrying it.
PRESENT="numpy packaging"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

cd "$ROOT"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >>"$exclude"

rm -rf "$DEST"
mkdir -p "$DEST"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
target_args=(--only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp "${platform_args[@]}")
"$PY" -m pip download -q --no-deps "${target_args[@]}" -d "$DEST" "${WHEELS[@]}"

# They install for that Python and platform (no compiling, nothing from a registry) ...
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip install -q --dry-run --no-index --no-deps --target "$tmp/site" "${target_args[@]}" "$DEST"/*.whl
# ... one version of each, and every requirement is met by a carried wheel or by what the machine has.
"$PY" - "$DEST" "$PRESENT" <<'EOF'
import sys, zipfile
from pathlib import Path
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
from pip._vendor.packaging.version import Version

dest, present = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}
have, needs = {}, []
for whl in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    head = dict(line.split(": ", 1) for line in meta.splitlines() if line.startswith(("Name: ", "Version: ")))
    name = canonicalize_name(head["Name"])
    if name in have:
        sys.exit(f"two versions of {name} in {dest}: the install would stop")
    have[name] = Version(head["Version"])
    needs += [(name, Requirement(l.split(": ", 1)[1])) for l in meta.splitlines() if l.startswith("Requires-Dist: ")]
missing = []
for who, req in needs:
    if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": "3.12"}):
        continue  # an extra, or another Python's
    dep = canonicalize_name(req.name)
    if dep in have:
        if not req.specifier.contains(have[dep], prereleases=True):
            missing.append(f"{who} needs {req}, carried {dep} {have[dep]}")
    elif dep not in present:
        missing.append(f"{who} needs {req}: neither carried nor on the machine")
if missing:
    sys.exit("unmet requirements:\n  " + "\n  ".join(missing))
EOF
total=0
for f in "$DEST"/*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    printf '%10d  %s\n' "$size" "$(basename "$f")"
done
printf '%10d  total (%s MiB; a device call carries at most 64 MiB with the working tree)\n' "$total" \
    "$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')"
