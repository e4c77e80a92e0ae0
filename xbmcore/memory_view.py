"""What the memory hands the loss: each probe anchor's hardest memory negatives, with their age.

Every ``train.memory_view_every`` steps of a phase with a memory, and at the phase's end, `MemoryView` embeds a
fixed set of anchors (the drift probe's images, or a seeded subset of ``train.memory_view_anchors`` training images
without a probe), computes their similarities to every memory entry in float64 and emits one ``memory_view``
event (xbmcore.events):

  anchors      the first ``memory_view_anchors`` anchors, each ``{index, label, super, negatives}`` with its
               ``memory_view_k`` hardest negatives (highest similarity, another label), best first:
               ``{index, sim, age, label, same_super}``
  age_edges    the age histogram's bin edges in steps (the last bin is open)
  age_hist     the ages of the active negatives (pairs with a non-zero gradient of the run's loss) of all the
               anchors, counted per bin
  age_quantiles  {"p10", "p50", "p90"} of those ages (None without an active negative)
  super_share  the share of the active negatives from the anchor's super-class (None without super-classes)
  topk_super_share  the same share among the listed hardest negatives

Ages are step - the step the entry was written. An anchor's "super" and "same_super" are None where the dataset
has no super-classes. The anchors' embeddings are the drift probe's own at that step where it embedded them (a
probe step), else the trainer's `_embed` (eval mode, no gradient, preserved RNG): training is bit-identical with
the view on or off. Cost: one anchors x K product and the loss's pair gradient on it, at the view steps only
(bench/memory_view.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Subset

from xbmcore.drift import clean_view
from xbmcore.events import make_event
from xbmcore.hooks import Hook

if TYPE_CHECKING:
    from xbmcore.trainer import Trainer

# The age histogram's bin edges in steps; the last bin is open ([5000, inf)).
AGE_EDGES = (0, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9}
# Anchors per chunk: CHUNK_ELEMENTS // memory size, so that the float64 anchors x K product stays ~256 MB.
CHUNK_ELEMENTS = 2 ** 25


def super_labels(dataset: Any) -> np.ndarray | None:
    """The dataset's super-class ids (N int64), or None when it has none (no attribute, or all -1).

    Args:
        dataset: a training split (an ImageDataset has ``super_labels``).

    Returns:
        The ids, or None.
    """
    s = getattr(dataset, "super_labels", None)
    if s is None:
        return None
    s = np.asarray(s, dtype=np.int64)
    return None if len(s) == 0 or (s < 0).all() else s


def quantiles_of_counts(counts: np.ndarray, qs: list[float]) -> list[float | None]:
    """Quantiles (numpy's linear interpolation) of the integers 0..len(counts)-1 taken counts[v] times each.

    Args:
        counts: how many times each value occurs.
        qs: the quantiles, in [0, 1].

    Returns:
        One value per quantile; None each when there is no value.
    """
    total = int(counts.sum())
    if not total:
        return [None] * len(qs)
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        pos = q * (total - 1)
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        vlo, vhi = (float(np.searchsorted(cum, r, side="right")) for r in (lo, hi))
        out.append(vlo + (vhi - vlo) * (pos - lo))
    return out


@torch.no_grad()
def memory_view(anchors: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, entries: torch.Tensor,
                mem_labels: torch.Tensor, mem_indices: torch.Tensor, mem_steps: torch.Tensor, step: int, k: int,
                loss: Any = None, supers: np.ndarray | None = None, show: int | None = None) -> dict[str, Any]:
    """The memory view of a set of anchors: their hardest negatives and the ages of the active negatives.

    Args:
        anchors: A x D anchor embeddings.
        labels: A anchor labels.
        indices: A anchor dataset indices.
        entries: n x D memory entries as the loss sees them.
        mem_labels: n entry labels.
        mem_indices: n entry dataset indices.
        mem_steps: n steps at which the entries were written.
        step: the current step (ages are step - mem_steps).
        k: hardest negatives per anchor.
        loss: the run's PairLoss (its ``sim_gradient`` decides which negatives are active); None: every negative
            with a positive similarity counts as active.
        supers: the training split's super-class ids by dataset index, or None.
        show: how many anchors to list (the first ones); None: all.

    Returns:
        The ``memory_view`` event's fields (see the module docstring).
    """
    dev = anchors.device
    mem_labels, mem_indices = mem_labels.to(dev), mem_indices.to(dev)
    entries = entries.to(dev)
    n = len(mem_labels)
    age = (step - mem_steps.to(dev)).long().clamp(min=0)  # n
    kk = min(k, n)
    s = None if supers is None else torch.from_numpy(np.asarray(supers, dtype=np.int64)).to(dev)
    sup_m = None if s is None else s[mem_indices]
    edges = torch.tensor(AGE_EDGES, dtype=torch.float64, device=dev)
    hist = torch.zeros(len(AGE_EDGES), dtype=torch.int64, device=dev)
    tops, top_sims = [], []
    counts = torch.zeros(int(age.max()) + 1 if n else 1, dtype=torch.int64, device=dev)  # active negatives per age
    n_active = n_active_same = n_top = n_top_same = 0
    # Anchors in chunks: the float64 A x n product of a large memory (index mode) stays within CHUNK_ELEMENTS.
    chunk = max(1, CHUNK_ELEMENTS // max(n, 1))
    for a0 in range(0, len(anchors), chunk):
        a, lab, idx = anchors[a0:a0 + chunk], labels[a0:a0 + chunk].to(dev), indices[a0:a0 + chunk].to(dev)
        sim = a.double() @ entries.double().T  # a x n
        neg = lab[:, None] != mem_labels[None, :]
        top_sim, top = sim.masked_fill(~neg, -torch.inf).topk(kk, dim=1)
        if loss is not None:
            g, lneg = loss.sim_gradient(a.float(), lab, entries.float(), mem_labels, idx, mem_indices)
            active = lneg & (g != 0)
        else:
            active = neg & (sim > 0)
        ages = age[None, :].expand_as(active)[active]
        hist += torch.bincount(torch.bucketize(ages.double(), edges, right=True) - 1, minlength=len(AGE_EDGES))
        counts += torch.bincount(ages, minlength=len(counts))
        n_active += int(active.sum())
        found = torch.isfinite(top_sim)
        n_top += int(found.sum())
        if s is not None:
            same = s[idx][:, None] == sup_m[None, :]
            n_active_same += int((same & active).sum())
            n_top_same += int((same.gather(1, top) & found).sum())
        tops.append(top)
        top_sims.append(top_sim)
    top, top_sim = torch.cat(tops), torch.cat(top_sims)
    q = quantiles_of_counts(counts.cpu().numpy(), list(QUANTILES.values()))
    super_share = None if s is None or not n_active else n_active_same / n_active
    topk_super_share = None if s is None or not n_top else n_top_same / n_top
    sup_a = None if s is None else s[indices.to(dev)]
    rows = []
    n_show = len(anchors) if show is None else min(show, len(anchors))
    sel = top[:n_show]  # only the listed entries go to Python
    top_s, age_l = top_sim[:n_show].tolist(), age[sel].tolist()
    ml, mi = mem_labels[sel].tolist(), mem_indices[sel].tolist()
    sa = None if sup_a is None else sup_a.tolist()
    sm = None if sup_m is None else sup_m[sel].tolist()
    for a in range(n_show):
        negs = [{"index": mi[a][j], "sim": s_, "age": age_l[a][j], "label": ml[a][j],
                 "same_super": None if sa is None else sa[a] == sm[a][j]}
                for j, s_ in enumerate(top_s[a]) if s_ != -float("inf")]
        rows.append({"index": int(indices[a]), "label": int(labels[a]), "super": None if sa is None else sa[a],
                     "negatives": negs})
    return {"k": int(k), "anchors": rows, "age_edges": list(AGE_EDGES), "age_hist": hist.tolist(),
            "age_quantiles": dict(zip(QUANTILES, q)), "active_negatives": n_active,
            "super_share": super_share, "topk_super_share": topk_super_share, "memory_size": n}


class MemoryView(Hook):
    """Emits a ``memory_view`` event every `every` steps of a phase with a memory, and at its end.

    Args:
        every: steps between views (``train.memory_view_every``; 0: only at the phase's end).
        k: hardest negatives per anchor (``train.memory_view_k``).
        show: anchors listed in the event (``train.memory_view_anchors``); every anchor counts in the statistics.

    Attributes:
        items (Tensor | None): the anchors' dataset indices (set at the first view).
        last (int): the last step viewed (-1: none).
    """

    def __init__(self, every: int, k: int, show: int):
        self.every, self.k, self.show = every, k, show
        self.items: torch.Tensor | None = None
        self.last = -1

    def on_step(self, trainer: Trainer) -> None:
        """At every `every`-th step of a phase with a memory: record the view.

        Args:
            trainer: the trainer running the phase.
        """
        if self.every and trainer.step % self.every == 0:
            self.record(trainer)

    def on_phase_end(self, trainer: Trainer, error: BaseException | None) -> None:
        """At the end of a phase with a memory that completed: record the view (once per step).

        Args:
            trainer: the trainer running the phase.
            error: the exception that ends the phase, or None.
        """
        if error is None:
            self.record(trainer)

    def anchors(self, trainer: Trainer) -> torch.Tensor:
        """The anchors' dataset indices: the drift probe's images, or a seeded subset without a probe.

        Args:
            trainer: the trainer.

        Returns:
            The sorted dataset indices.
        """
        if self.items is None:
            if trainer.probe is not None:
                self.items = trainer.probe.items.clone()
            else:
                n = len(trainer.splits.train)
                g = torch.Generator().manual_seed(trainer.params.train.seed + 35)
                self.items = torch.randperm(n, generator=g)[:min(self.show, n)].sort().values
        return self.items

    def embed(self, trainer: Trainer) -> torch.Tensor:
        """The anchors' embeddings at this step: the drift probe's when it embedded them now, else the trainer's.

        Args:
            trainer: the trainer.

        Returns:
            A x D float32 embeddings on the training device.
        """
        probe = trainer.probe
        current = getattr(probe, "current", None)
        if current is not None and current[0] == trainer.step:
            emb = current[1]
            return (emb if probe.split is None else emb[:, :probe.split]).to(trainer.device)
        ds = Subset(clean_view(trainer.splits.train), self.anchors(trainer).tolist())
        return trainer._embed(ds)[0].float()

    def record(self, trainer: Trainer) -> dict[str, Any] | None:
        """Compute and emit the view of this step (nothing without a memory, or when this step has one).

        Args:
            trainer: the trainer.

        Returns:
            The event's fields, or None when nothing was recorded.
        """
        memory = trainer.state.memory
        if memory is None or not len(memory) or trainer.step == self.last:
            return None
        self.last = trainer.step
        trainer.flush()  # the step's event before the view
        items = self.anchors(trainer)
        emb = self.embed(trainer)
        feats, mem_labels, mem_indices = memory.get()
        with torch.no_grad(), trainer.autocast():
            entries = trainer.model.embed_features(feats) if trainer.store_features else feats
        train = trainer.splits.train
        labels = torch.as_tensor(np.asarray(train.labels)[items.numpy()], dtype=torch.int64, device=emb.device)
        view = memory_view(emb, labels, items.to(emb.device), entries.float(), mem_labels, mem_indices,
                           memory.steps[: len(memory)], trainer.step, self.k, getattr(trainer.objective, "loss", None),
                           super_labels(train), self.show)
        trainer.emit(make_event("memory_view", trainer.step, phase=trainer.phase, **view))
        return view
