"""The library quickstart's scripts (docs/examples/, included in docs/library.md) run as a reader runs them:
`python docs/examples/<script>.py` from the project root, at small sizes, and do what the page says."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _r1(out: str, when: str) -> float:
    return float(re.search(rf"test R@1 {when}: ([0-9.]+)", out).group(1))


def test_own_loop_trains_with_the_memory():
    out = _run("own_loop.py", "--steps", "300", "--warmup", "100")
    # The memory term is on after the warm-up: negative pairs from the memory, and a memory that fills up
    # (K = 0.5 x 2,400 = 1,200 entries; 200 steps of 16 write 3,200).
    last = re.findall(r"step (\d+): loss .* memory ([0-9.]+) over (\d+) negative pairs\), memory (\d+)% full", out)
    assert last[-1][0] == "300" and int(last[-1][2]) > 0 and last[-1][3] == "100", out
    assert _r1(out, "after 300 steps") > _r1(out, "before training") + 0.05, out


def test_trainer_with_your_own_model_and_data(tmp_path):
    out = _run("trainer_own_model.py", "--steps", "20", "--warmup", "10", "--run-dir", str(tmp_path))
    assert "memory: 1200 of K = 1200 entries after the warm-up" in out, out
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 31))
    xbm = [e for e in steps if e["phase"] == "xbm"]
    assert len(xbm) == 20 and all(e["memory_fill"] == 1.0 and e["mem_neg_pairs"] > 0 for e in xbm)
    final = json.loads(re.search(r"test after 30 steps: (\{.*\})", out).group(1))
    assert set(final) == {"recall@1", "recall@10", "map@r", "r_precision"}
    # The printed evaluations are the event stream's: each val R@1 line has its eval event.
    evals = {e["step"]: e["metrics"]["recall@1"] for e in events if e["kind"] == "eval"}
    printed = {int(s): float(v) for s, v in re.findall(r"step (\d+): val R@1 ([0-9.]+)", out)}
    assert printed and printed == {s: round(v, 4) for s, v in evals.items()}
