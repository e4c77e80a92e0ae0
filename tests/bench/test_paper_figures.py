"""bench.paper_figures on a tiny configuration: the runs it plans, one CSV row per run, resumption, figures."""
from __future__ import annotations

import csv
import json

import xbmcore.evaluate
from bench import paper_figures
from reference64 import metrics_float64

TINY = ["-S", "data.synthetic.num_classes=24", "-S", "data.synthetic.image_size=16", "-S", "data.train_size=16",
        "-S", "data.test_resize=16", "-S", "data.test_size=16", "-S", "data.val_fraction=0.25",
        "-S", "train.drift_probe=8", "-S", "train.warmup_steps=4", "-S", "train.xbm_steps=4",
        "-S", "train.drift_every=2", "-S", "train.drift_dts=[2,4]", "-S", "data.synthetic.pretrain_classes=0",
        "-S", "model.pretrained=none"]


def rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def record_evaluations(monkeypatch) -> dict[str, tuple]:
    """Each row's evaluation embeddings by the row's key, (query, labels, gallery, gallery labels): those of the
    last evaluation of its split (xbmcore.evaluate.embed_split wrapped) when the row is appended."""
    last, by_key = {}, {}
    embed_split, append = xbmcore.evaluate.embed_split, paper_figures._append

    def recorded(model, splits, which, *args, **kwargs):
        last[which] = embed_split(model, splits, which, *args, **kwargs)
        return last[which]

    def appended(csv_path, row):
        by_key[row["key"]] = last.pop(row["split"])
        append(csv_path, row)

    monkeypatch.setattr(xbmcore.evaluate, "embed_split", recorded)
    monkeypatch.setattr(paper_figures, "_append", appended)
    return by_key


def test_runs_rows_resume_and_figures(tmp_path, capsys, monkeypatch):
    out, docs = tmp_path / "out", tmp_path / "docs"
    evaluated = record_evaluations(monkeypatch)
    argv = ["--out", str(out), "--docs", str(docs), "--batches", "8", "--seeds", "0", "--ratios", "0.5", "1.0",
            "--warmup-steps", "3", "--xbm-steps", "3", "--only", "fig1a", "fig1b", "drift",
            "--lock", str(tmp_path / "heavy.lock"), *TINY]
    assert paper_figures.main(argv) == 0
    got = rows(out)
    plan = {(r["figure"], r["norm"], r["memory"], r["ratio"]) for r in got}
    assert plan == {("fig1a", "batch", "False", "0.0"), ("fig1a", "batch", "True", "1.0"),
                    ("fig1b", "batch", "True", "0.5"), ("fig1a", "group", "False", "0.0"),
                    ("fig1a", "group", "True", "1.0"), ("drift", "batch", "True", "1.0")}
    assert len({r["key"] for r in got}) == len(got) == 6
    # Each row's metrics are its own model's, on the test split: recomputed in float64 from the embeddings of its
    # evaluation, equal to the CSV's 4 decimals (a query within float32 rounding of a flip may differ, if any).
    for r in got:
        q, labels, gallery, _ = evaluated[r["key"]]
        assert gallery is None  # query = gallery
        ref, ties, unsure = metrics_float64(q, labels, (1, 10))
        for k in ("recall@1", "recall@10"):
            assert abs(float(r[k]) - ref[k]) <= 5e-5 + ties[k] / len(q), (r["figure"], k)
        assert abs(float(r["map@r"]) - ref["map@r"]) <= 5e-5 + unsure, r["figure"]
    fig1 = [r for r in got if r["figure"] != "drift"]
    assert {r["warmup_end"] for r in fig1} == {"3"} and {r["xbm_steps"] for r in fig1} == {"3"}
    drift = next(r for r in got if r["figure"] == "drift")
    with open(out / "drift" / f"{drift['key']}.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    assert [h["step"] for h in hist] == ["0", "2", "4", "6", "8"] and hist[-1]["D_2"] and hist[-1]["D_4"]
    # The Markdown drift table holds the CSV's values at the probe steps it picks (step 0 has none yet).
    capsys.readouterr()
    assert paper_figures.main([*argv, "--plot", "--markdown"]) == 0
    table = [x for x in capsys.readouterr().err.splitlines() if x.startswith("| ") and "D(t" not in x]
    want = {f"| {h['step']}{' (memory on)' if h['step'] == drift['warmup_end'] else ''} | {float(h['D_2']):.3f} | "
            + (f"{float(h['D_4']):.3f} |" if h["D_4"] else " |") for h in hist if h["D_2"]}
    assert want <= set(table) and len(want) == 4
    assert sorted(p.name for p in docs.iterdir()) == ["paper_drift.png", "paper_fig1a_batch.png",
                                                       "paper_fig1b_ratio.png"]
    # Run again: every row is there, so nothing is trained and the CSV is unchanged.
    before = (out / "results.csv").read_bytes()
    assert paper_figures.main(argv) == 0
    assert (out / "results.csv").read_bytes() == before


def test_markdown_tables_come_from_the_csv(tmp_path, capsys):
    out, docs = tmp_path / "out", tmp_path / "docs"
    argv = ["--out", str(out), "--docs", str(docs), "--batches", "8", "--seeds", "0", "1", "--ratios", "0.5", "1.0",
            "--warmup-steps", "3", "--xbm-steps", "3", "--only", "fig1a", "fig1b", *TINY]
    assert paper_figures.main(argv) == 0
    capsys.readouterr()
    assert paper_figures.main([*argv, "--plot", "--markdown"]) == 0
    md = capsys.readouterr().err
    got = {(r["figure"], r["norm"], r["memory"], r["ratio"], r["seed"]): float(r["recall@1"]) for r in rows(out)}
    off = [got[("fig1a", "batch", "False", "0.0", s)] for s in "01"]
    on = [got[("fig1a", "batch", "True", "1.0", s)] for s in "01"]
    gains = " / ".join(f"{100 * (b - a):+.1f}" for a, b in zip(off, on))
    line = next(x for x in md.splitlines() if x.startswith("| 8 |"))
    assert f"{sum(off) / 2:.4f}" in line and f"{sum(on) / 2:.4f}" in line and gains in line
    assert "| 0.5 | 0 1 |" in md and "Fig. 1b, batch 8" in md


def test_order_ablation_reuses_the_rows_of_a_csv_from_before_the_setting(tmp_path, capsys):
    out, docs = tmp_path / "out", tmp_path / "docs"
    base = ["--out", str(out), "--docs", str(docs), "--batches", "8", "--order-batches", "8", "--seeds", "0",
            "--warmup-steps", "3", "--xbm-steps", "3", *TINY]
    assert paper_figures.main([*base, "--only", "fig1a", "-S", "memory.enqueue=after"]) == 0
    # As the CSV was before `memory.enqueue` existed: no such column, and every XBM run had the order `after`.
    old = rows(out)
    assert {r["enqueue"] for r in old} == {"after"} and len(old) == 4  # BatchNorm and GroupNorm, with and without
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in paper_figures.COLUMNS if c != "enqueue"])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k != "enqueue"} for r in old)
    # The ablation's baseline and `after` runs are those rows (same keys): only `before` is trained, and the file
    # gains the column, the old rows marked `after`.
    assert paper_figures.main([*base, "--only", "order"]) == 0
    got = rows(out)
    assert [(r["figure"], r["norm"], r["memory"], r["enqueue"]) for r in got[4:]] == [
        ("order", "batch", "True", "before")]
    assert got[:4] == old
    capsys.readouterr()
    assert paper_figures.main([*base, "--only", "order", "--plot", "--markdown"]) == 0
    md = capsys.readouterr().err
    off, after, before = (float(r["recall@1"]) for r in got if r["norm"] == "batch")
    line = next(x for x in md.splitlines() if x.startswith("| 8 | 0 |"))
    assert line == f"| 8 | 0 | {off:.4f} | {after:.4f} | {before:.4f} | {100 * (before - after):+.1f} |"


def test_validation_runs_are_rows_of_their_own_and_stay_out_of_the_figures(tmp_path, capsys):
    out, docs = tmp_path / "out", tmp_path / "docs"
    base = ["--out", str(out), "--docs", str(docs), "--batches", "8", "--seeds", "0", "--only", "fig1a",
            "--warmup-steps", "3", "--xbm-steps", "3", "--baseline-set", "train.lr=0.0005", *TINY,
            "-S", "train.lr=0.003"]
    assert paper_figures.main([*base, "--split", "val"]) == 0
    assert paper_figures.main(base) == 0
    got = rows(out)
    val, test = [r for r in got if r["split"] == "val"], [r for r in got if r["split"] == "test"]
    assert len(val) == len(test) == 4  # BatchNorm and GroupNorm, with and without XBM: the same runs, twice
    assert {r["key"] for r in val} == {r["key"] + "-val" for r in test}
    # The baseline at its own lr (--baseline-set), XBM at the params' (-S).
    assert {(r["memory"], r["lr"]) for r in got} == {("False", "0.0005"), ("True", "0.003")}
    assert {r["recall@1"] for r in val} != {r["recall@1"] for r in test}  # other classes, other values
    capsys.readouterr()
    assert paper_figures.main([*base, "--plot", "--markdown"]) == 0
    summary = capsys.readouterr().out
    seen = {v for row in json.loads(summary)["table"] for v in row["recall@1"]["runs"]}
    assert seen == {float(r["recall@1"]) for r in test}


def test_methods_are_scored_at_their_best_validation_checkpoint(tmp_path, capsys, monkeypatch):
    """--method runs beside the baseline, each scored on the test split with the model of its best validation
    Recall@1 (the curve's argmax, the phase's start included); --same-images and --scale-momentum set each batch's
    steps and momentum; the tables are built from the rows."""
    import torch
    from xbmcore.trainer import Trainer

    out, docs = tmp_path / "out", tmp_path / "docs"
    validated: dict[int, dict] = {}  # this run's model state at each validated phase step
    scored = {}  # row key -> (its best step's state, the state the test split was evaluated with)
    measure, evaluate, append = paper_figures._Best._measure, Trainer.evaluate, paper_figures._append

    def keep(self, trainer):
        if trainer.step == self.start:
            validated.clear()
        measure(self, trainer)
        validated[self.curve[-1][0]] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def spy(self, split="val"):
        if split == "test":
            validated["tested"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return evaluate(self, split)

    def appended(csv_path, row):
        scored[row["key"]] = (validated[int(row["best_step"])], validated["tested"])
        append(csv_path, row)

    monkeypatch.setattr(paper_figures._Best, "_measure", keep)
    monkeypatch.setattr(Trainer, "evaluate", spy)
    monkeypatch.setattr(paper_figures, "_append", appended)
    argv = ["--out", str(out), "--docs", str(docs), "--batches", "8", "16", "--seeds", "0", "--only", "fig1a",
            "--warmup-steps", "3", "--xbm-steps", "8", "--same-images", "--scale-momentum", "--eval-every", "2",
            "--method", "plain", "--method", "ema:memory.momentum=0.5", *TINY, "-S", "train.lr=0.01"]
    assert paper_figures.main(argv) == 0
    got = [r for r in rows(out) if r["norm"] == "batch"]  # (from scratch, GroupNorm's runs are made too)
    assert sorted((r["batch"], r["method"], r["xbm_steps"], r["eval_every"]) for r in got) == [
        ("16", "baseline", "4", "1"), ("16", "ema", "4", "1"), ("16", "plain", "4", "1"),
        ("8", "baseline", "8", "2"), ("8", "ema", "8", "2"), ("8", "plain", "8", "2")]
    for r in got:
        with open(out / "curves" / f"{r['key']}.csv", newline="") as f:
            curve = [(int(c["step"]), float(c["val_recall@1"])) for c in csv.DictReader(f)]
        assert [s for s, _ in curve] == list(range(0, int(r["xbm_steps"]) + 1, int(r["eval_every"])))
        assert int(r["best_step"]) == max(curve, key=lambda c: (c[1], -c[0]))[0]  # the first best
        best, tested = scored[r["key"]]
        assert all(torch.equal(best[k], tested[k]) for k in best)  # scored with the best checkpoint's weights
    # 0.5 at batch 8 is 0.5 ** (16 / 8) at batch 16: the momentum is in the run's params, hence in its key
    assert paper_figures._scaled(paper_figures.argparse.Namespace(batches=[8, 16], scale_momentum=True),
                                 ["memory.momentum=0.5", "train.lr=1"], 16) == ["memory.momentum=0.25", "train.lr=1"]
    capsys.readouterr()
    assert paper_figures.main([*argv, "--plot", "--markdown"]) == 0
    md = capsys.readouterr().err
    by = {(r["batch"], r["method"]): float(r["recall@1"]) for r in got}
    line = next(x for x in md.splitlines() if x.startswith("| 8 | 0 |"))
    assert line.split(" | ")[2:5] == [f"{by[('8', m)]:.4f}" for m in ("baseline", "plain", "ema")]
    assert f"{100 * (by[('8', 'ema')] - by[('8', 'baseline')]):+.1f}" in line
    assert sorted(p.name for p in docs.iterdir()) == ["paper_fig1a_batch.png", "paper_val_curves.png"]
