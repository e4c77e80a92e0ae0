"""Pretraining as a classifier: the normalised softmax against a float64 loop, and the loop on a tiny pretrain split."""
from __future__ import annotations

import math

import pytest
import torch

from xbmcore.config import DataParams, ModelParams, PretrainParams
from xbmcore.data import open_splits, prepare_dataset
from xbmcore.models import build_model
from xbmcore.pretrain import NormSoftmax, pretrain


def test_norm_softmax_matches_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    B, D, C, T = 6, 5, 4, 0.1
    emb = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    emb.requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    head = NormSoftmax(D, C, T).double()
    with torch.no_grad():
        head.proxies.copy_(torch.randn(C, D, generator=g, dtype=torch.float64))
    loss, acc = head(emb, labels)
    # The definition, one anchor and one class at a time.
    total, right = 0.0, 0
    for i in range(B):
        logits = []
        for c in range(C):
            w = head.proxies[c].detach()
            cos = sum(emb[i, d] * w[d] for d in range(D)) / math.sqrt(sum(w[d].item() ** 2 for d in range(D)))
            logits.append(cos / T)
        lse = torch.logsumexp(torch.stack(logits), 0)
        total = total + (lse - logits[int(labels[i])])
        right += int(max(range(C), key=lambda c: float(logits[c])) == int(labels[i]))
    ref = total / B
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    assert acc.item() == right / B
    g_ours, = torch.autograd.grad(loss, emb)
    g_ref, = torch.autograd.grad(ref, emb)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)


def _tiny_split(tmp_path):
    p = DataParams(prepared=str(tmp_path), train_size=16, test_resize=16, test_size=16,
                   synthetic={"num_classes": 8, "classes_per_superclass": 4, "image_size": 16, "pretrain_classes": 8,
                              "images_per_class_min": 6, "images_per_class_max": 6})
    return open_splits(prepare_dataset(p, tmp_path, progress=False), p).pretrain


def test_pretraining_learns_the_classes_and_is_seeded(tmp_path):
    split = _tiny_split(tmp_path)
    assert split.num_classes == 8 and len(split) == 48
    p = PretrainParams(steps=100, batch_size=16, lr=3e-3, temperature=0.1, seed=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(ModelParams(embedding_dim=16))
        logged = []
        history = pretrain(model, split, p, torch.device("cpu"), on_log=lambda s, m: logged.append(s), log_every=30)
        runs.append((model.state_dict(), history))
        assert logged == [30, 60, 90, 100] and [h["step"] for h in history] == logged  # and the last step
    (a, ha), (b, hb) = runs
    assert ha == hb and all(torch.equal(a[k], b[k]) for k in a)  # the same seeds, the same run
    # 8 classes: chance is 0.125 and the loss ln 8 = 2.08 at the start.
    assert ha[-1]["loss"] < 0.5 * ha[0]["loss"] and ha[-1]["accuracy"] > 0.7
    assert ha[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule ends at 0


def test_a_batch_larger_than_the_split_is_refused(tmp_path):
    split = _tiny_split(tmp_path)
    with pytest.raises(ValueError, match=r"pretrain.batch_size \(64\) exceeds the pretrain split \(48 images\)"):
        pretrain(build_model(ModelParams(embedding_dim=16)), split, PretrainParams(steps=1, batch_size=64),
                 torch.device("cpu"))
