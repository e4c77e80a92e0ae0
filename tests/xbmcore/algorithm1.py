"""Algorithm 1 of the XBM paper (Wang et al., CVPR 2020) as its own small float64 loop, for the trainer's tests.

    anchors = f.forward(x)
    enqueue(M, (anchors.detach(), y)); dequeue(M)
    sim = anchors @ M.feats.T
    loss = pair_based_loss(sim, y, M.labels); loss.backward(); optimizer.step()

Written from the paper's pseudo-code and the loss's definition, sharing no code with xbmcore: the memories are a
ring written slot by slot and an ordered dict of images, the contrastive loss takes its pairs from explicit
masks. As in the product, the loss is L(batch, batch) + w * L(batch, M), and an anchor's own copies (same
dataset index) are no pairs. `order="after"` moves the enqueue behind the loss (the trainer's comparison mode).
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch

COPY_EPS = 1e-5  # a positive at similarity >= 1 - 1e-5 is a copy of the anchor, not a pair (the official code)


def contrastive(a, y, ia, ref, ref_y, ref_i, margin):
    """Mean over the active pairs of (1 - s) for positives and (s - margin) for negatives; own copies skipped."""
    s = a @ ref.T
    valid = ref_i[None, :] != ia[:, None]
    same = y[:, None] == ref_y[None, :]
    pos = valid & same & (s < 1 - COPY_EPS)
    neg = valid & ~same & (s > margin)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    total = (1 - s)[pos].sum() + (s - margin)[neg].sum()
    return total / max(n_pos + n_neg, 1), n_pos, n_neg


class Ring:
    """The paper's FIFO queue of K entries: the n-th embedding ever written goes to slot n mod K."""

    def __init__(self, feats, labels, indices, K):
        self.K, self.n = K, 0
        self.feats = torch.zeros(K, feats.shape[1], dtype=torch.float64)
        self.labels = torch.zeros(K, dtype=torch.int64)
        self.indices = torch.zeros(K, dtype=torch.int64)
        self.push(feats, labels, indices)

    def push(self, feats, labels, indices):
        for f, y, i in zip(feats, labels, indices):
            slot = self.n % self.K
            self.feats[slot], self.labels[slot], self.indices[slot] = f, y, i
            self.n += 1

    def contents(self):
        m = min(self.n, self.K)
        return self.feats[:m], self.labels[:m], self.indices[:m]


class PerImage:
    """One entry per image, at most K, in write order. A batch is written at once: within it the last copy of
    an image counts; its images become the newest, in batch order; the images it brings in take the places of
    the least recently written images outside the batch."""

    def __init__(self, feats, labels, indices, K):
        self.K, self.items = K, OrderedDict()
        self.push(feats, labels, indices)

    def push(self, feats, labels, indices):
        last = {int(i): r for r, i in enumerate(indices)}
        rows = sorted(last.values())
        for i in last:
            self.items.pop(i, None)
        while len(self.items) + len(rows) > self.K:
            self.items.popitem(last=False)
        for r in rows:
            self.items[int(indices[r])] = (feats[r].clone(), int(labels[r]))

    def contents(self):
        idx = list(self.items)
        return (torch.stack([self.items[i][0] for i in idx]), torch.tensor([self.items[i][1] for i in idx]),
                torch.tensor(idx))


def step(model, weights, imgs, labels, indices, memory, weight, margin, order="before"):
    """One XBM step of Algorithm 1 in float64 from `weights` (the trainer's before its step): returns the loss,
    its two parts, the pair counts and the gradient of every parameter; `memory` is updated in place."""
    net = copy.deepcopy(model).double()
    net.load_state_dict({k: v.double() for k, v in weights.items()})
    a = net(imgs.double())
    if order == "before":
        memory.push(a.detach(), labels, indices)
    batch, bp, bn = contrastive(a, labels, indices, a, labels, indices, margin)
    feats, mem_labels, mem_indices = memory.contents()
    mem, mp, mn = contrastive(a, labels, indices, feats, mem_labels, mem_indices, margin)
    loss = batch + weight * mem
    grads = torch.autograd.grad(loss, list(net.parameters()))
    if order == "after":
        memory.push(a.detach(), labels, indices)
    return {"loss": loss.item(), "loss_batch": batch.item(), "loss_memory": mem.item(), "pos_pairs": bp,
            "neg_pairs": bn, "mem_pos_pairs": mp, "mem_neg_pairs": mn}, grads


def initial(memory_state, mode, K):
    """The reference memory holding what the trainer's memory holds (after memory init), in write order."""
    fill = int(memory_state["fill"])
    feats = memory_state["feats"][:fill].double()
    labels, indices = memory_state["labels"][:fill], memory_state["indices"][:fill]
    if mode == "queue":
        assert fill == K and int(memory_state["ptr"]) == 0  # memory init fills the ring exactly once
        return Ring(feats, labels, indices, K)
    order = torch.argsort(memory_state["seq"][:fill])
    return PerImage(feats[order], labels[order], indices[order], K)


def compare_memory(memory_state, ref, mode, atol):
    """The trainer's memory (a state_dict) holds what the reference holds: slot by slot for the ring, image by
    image for the per-image memory."""
    fill = int(memory_state["fill"])
    feats, labels, indices = memory_state["feats"][:fill], memory_state["labels"][:fill], \
        memory_state["indices"][:fill]
    want_f, want_y, want_i = ref.contents()
    assert fill == len(want_i)
    if mode == "queue":
        assert int(memory_state["ptr"]) == ref.n % ref.K
        assert torch.equal(indices, want_i) and torch.equal(labels, want_y)
        torch.testing.assert_close(feats.double(), want_f, rtol=0, atol=atol)
        return
    slot = {int(i): s for s, i in enumerate(indices)}
    assert sorted(slot) == sorted(want_i.tolist())
    order = torch.tensor([slot[int(i)] for i in want_i])
    assert torch.equal(labels[order], want_y)
    torch.testing.assert_close(feats[order].double(), want_f, rtol=0, atol=atol)


def record(trainer):
    """Record every training step of `trainer` from here on: the weights before it, its batch (this rank's
    images, labels, indices), and after it the gradients and the memory. Returns the list the records go to."""
    from xbmcore.hooks import Hook

    steps = []
    to_device = trainer.to_device

    def recording_to_device(batch):
        imgs, labels, indices = to_device(batch)
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        steps.append({"weights": weights, "imgs": imgs.clone(), "labels": labels.clone(),
                      "indices": indices.clone()})
        return imgs, labels, indices

    class After(Hook):
        def on_step(self, t):
            steps[-1]["grads"] = [p.grad.detach().clone() for p in t.model.parameters()]
            steps[-1]["memory"] = {k: v.clone() for k, v in t.state.memory.state_dict().items()}

    trainer.to_device = recording_to_device
    trainer.hooks.append(After())
    return steps
