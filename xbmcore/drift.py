"""Feature drift as the XBM paper measures it (Wang et al., CVPR 2020, Sec. 3.2 and Fig. 3):

    D(t; dt) = mean over the probe images x of ||f_t(x) - f_{t-dt}(x)||^2

f_t is the model after step t, and x a fixed set of `train.drift_probe` training images seen through the test
transform (one clean view each, so D is the model's change alone; the per-step drift of re-entering memory entries
also mixes two augmentations). The paper's argument for the memory is that D(t; dt) becomes small after a short
warm-up; `train.warmup_steps: auto` ends the warm-up when it has (xbmcore.hooks.DriftMonitor, the probe's hook
of the training loop).

Whether the drift is directed or random: a random walk of step size sigma gives D(t; 100) = 10 D(t; 10), so
``directed = D(t; 100) / (10 D(t; 10))`` is 1 for random drift and up to 10 for a steady motion; `cos10` is the
mean cosine between an image's 10-step displacement at this probe step and at the previous one (0 for random
drift, 1 for a steady motion). Where the network moves: with a model that exposes its backbone (EmbeddingNet), the
probe also measures D on the backbone's pooled features, normalised (`D_backbone`), beside D on the head's output.

`staleness` measures where the memory term's gradient comes from, by the age of the entries (step now - step
written): the share of sum |dL/ds| in each of AGE_BUCKETS, and the mean age of the active negatives.

Cost: D(t; dt) is reported at the probe steps t = 0, every, 2 every, ...; it needs the embeddings at t and at t - dt
for each dt, so the probe embeds its images at those steps only (t and t - 10 for every = 100 and dts 10, 100,
1000: twice per 100 steps) and keeps a snapshot only while a later probe step still needs it (about
max(dts) / every + len(dts) snapshots of probe x D floats). The trainer's embedding function runs in eval mode
without gradients on a preserved RNG, so a run trains bit-identically with the probe on or off.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

if TYPE_CHECKING:
    from xbmcore.losses import PairLoss
    from xbmcore.memory import CrossBatchMemory

log = logging.getLogger(__name__)

# staleness' age buckets in steps: [0, 10), [10, 100), [100, 1000), [1000, inf)
AGE_BUCKETS = (10, 100, 1000)
AGE_NAMES = ("0-10", "10-100", "100-1000", "1000+")


class WithBackbone(nn.Module):
    """An EmbeddingNet's embedding and its normalised pooled backbone features, side by side: B x (D + C).

    Args:
        net: a model with `backbone`, `pool` and `head` (an EmbeddingNet; see `wraps`).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @staticmethod
    def wraps(net: nn.Module) -> bool:
        """Whether `net` exposes what this wrapper reads (backbone, pool, head, embedding_dim).

        Args:
            net: any model.

        Returns:
            True for an EmbeddingNet-like model.
        """
        return all(hasattr(net, a) for a in ("backbone", "pool", "head", "embedding_dim"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding and the normalised features of a batch.

        Args:
            x: B x 3 x H x W images.

        Returns:
            B x (D + C): the unit-norm embedding, then the unit-norm pooled backbone features.
        """
        f = self.net.pool(self.net.backbone(x))
        return torch.cat([F.normalize(self.net.head(f), dim=1), F.normalize(f.float(), dim=1).to(f.dtype)], 1)


class Features(nn.Module):
    """An EmbeddingNet's pooled backbone features (B x C, float32): what a memory with store: features keeps.

    Args:
        net: a model with `backbone` and `pool` (an EmbeddingNet).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features of a batch.

        Args:
            x: B x 3 x H x W images.

        Returns:
            B x C float32 pooled backbone features (not normalised).
        """
        return self.net.pool(self.net.backbone(x)).float()


@torch.no_grad()
def staleness(loss: PairLoss, emb: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
              memory: CrossBatchMemory, step: int, entries: torch.Tensor | None = None) -> dict[str, Any]:
    """Where the memory term's gradient comes from: `grad_share` {bucket: share of sum |dL/ds_ij| over the pairs
    whose entry's age falls in the bucket}, `active_neg_age` (mean age of the entries in active negative pairs,
    those with a non-zero gradient; None without any), `mean_age` of all entries. Ages are `step` - the step
    each entry was written. `loss` is the objective's pair loss; emb, labels, indices: this rank's batch; entries:
    what the loss pairs the anchors with when it is not the stored vectors (memory.store: features).

    Args:
        loss: the objective's pair loss (``XBMObjective.loss``); its `sim_gradient` gives dL/ds.
        emb: B x D anchor embeddings of this rank's batch.
        labels: B integer labels of the anchors.
        indices: B dataset indices of the anchors.
        memory: the (non-empty) cross-batch memory.
        step: the current step; an entry's age is ``step - memory.steps[slot]``.
        entries: n x D embeddings standing in for the stored vectors (``memory.store: features``), or None.

    Returns:
        ``{"grad_share": {"0-10": ..., "10-100": ..., "100-1000": ..., "1000+": ...}, "active_neg_age": ...,
            "mean_age": ...}``: shares in [0, 1] (None when the gradient is zero), ages in steps (None when
            there is nothing to average).
    """
    feats, mem_labels, mem_indices = memory.get()
    feats = feats if entries is None else entries
    g, neg = loss.sim_gradient(emb, labels, feats, mem_labels, indices, mem_indices)  # B x K each
    age = (step - memory.steps[: len(memory)]).double()  # K
    weight = g.abs().double().sum(0)  # K: each entry's share of the anchors' gradient
    bucket = torch.bucketize(age, torch.tensor(AGE_BUCKETS, dtype=torch.float64, device=age.device), right=True)
    per = torch.zeros(len(AGE_NAMES), dtype=torch.float64, device=age.device).index_add_(0, bucket, weight)
    total = float(per.sum())
    active = (neg & (g != 0)).sum(0).double()  # K: active negative pairs per entry
    n_active = float(active.sum())
    return {"grad_share": {k: (float(v) / total if total else None) for k, v in zip(AGE_NAMES, per.tolist())},
            "active_neg_age": float((active * age).sum()) / n_active if n_active else None,
            "mean_age": float(age.mean()) if len(age) else None}


def clean_view(dataset: Dataset) -> Dataset:
    """The dataset as the test transform shows it (when it offers that): one deterministic view per image.

    Args:
        dataset: any dataset; an ImageDataset offers ``without_augmentation()``.

    Returns:
        ``dataset.without_augmentation()``, or `dataset` itself when it has no such method.
    """
    return dataset.without_augmentation() if hasattr(dataset, "without_augmentation") else dataset


class DriftProbe:
    """Embeds a fixed seeded subset of `dataset` at the steps D(t; dt) needs and computes D in float64.

    `embed(dataset)` returns the current model's N x D embeddings of a dataset (the trainer's, which leaves the
    model's mode and the RNG streams as they were). observe(step) is called after every optimiser step (and at
    the first step of a phase); it returns the `{dt: D(step; dt)}` of a probe step (the dts whose earlier snapshot
    exists), else None. `history` holds every probe step's values; state_dict / load_state_dict carry snapshots
    and history through checkpoints.

    Args:
        dataset: the training split; the probe images are a seeded subset of it, seen through `clean_view`.
        size: the number of probe images (``train.drift_probe``; capped at the dataset's size).
        every: the probe interval in steps (``train.drift_every``): D is reported at steps 0, every, 2 every, ...
        dts: the dt of each D(t; dt) (``train.drift_dts``), each >= 1.
        seed: the seed that picks the probe images.
        embed: ``embed(dataset) -> N x D`` embeddings of the current model, without side effects on the training
            (the trainer's: eval mode, no gradient, preserved RNG).
        split: when `embed` returns ``[embedding | backbone features]``, the column where the features start
            (``D_backbone`` is then measured on them); None: `embed` returns the embedding alone.

    Raises:
        ValueError: size, every or a dt below 1, or no dts.

    Attributes:
        items (Tensor): the probe images' dataset indices, sorted.
        every (int): the probe interval.
        dts (tuple[int, ...]): the sorted distinct dts.
        snapshots (dict[int, Tensor]): step -> n x D float32 embeddings kept for a later probe step.
        history (list[dict]): one entry per probe step: ``{"step": t, "D": {dt: value}}``, plus ``D_backbone``
            and ``cos10`` where measured (and ``directed`` and ``staleness`` added by DriftMonitor).
        last (int): the last step observed (-1: none).
        current (tuple[int, Tensor] | None): the last step embedded and its embeddings (not checkpointed).
    """

    def __init__(self, dataset: Dataset, size: int, every: int, dts: Sequence[int], seed: int,
                 embed: Callable[[Dataset], torch.Tensor], split: int | None = None):
        if size < 1 or every < 1 or not dts or min(dts) < 1:
            raise ValueError(f"DriftProbe: expected size >= 1, every >= 1 and dts >= 1, got {size}, {every}, "
                             f"{list(dts)}")
        n = min(size, len(dataset))
        g = torch.Generator().manual_seed(seed)
        self.items = torch.randperm(len(dataset), generator=g)[:n].sort().values  # n dataset indices
        self.every, self.dts = int(every), tuple(sorted({int(d) for d in dts}))
        self._subset = Subset(clean_view(dataset), self.items.tolist())
        self._embed = embed
        self.split = split  # embed returns [embedding | backbone features] split at this column (None: embedding)
        self._last_move: torch.Tensor | None = None  # the previous probe step's 10-step displacement (cos10)
        self.snapshots: dict[int, torch.Tensor] = {}  # step -> n x D float32 (CPU)
        self.history: list[dict[str, Any]] = []  # {"step": t, "D": {dt: value}}
        self.last = -1  # the last step observed: a phase that starts where the previous one ended skips it
        self.current: tuple[int, torch.Tensor] | None = None  # (step, embeddings) of the last step embedded

    # ---- which steps ----

    def is_probe_step(self, step: int) -> bool:
        """Whether D(step; dt) is reported at `step`.

        Args:
            step: a global optimiser step.

        Returns:
            True when `step` is a multiple of `every`.
        """
        return step % self.every == 0

    def wanted(self, step: int) -> bool:
        """A probe step, or t - dt of a later probe step t.

        Args:
            step: a global optimiser step.

        Returns:
            Whether the probe images must be embedded at `step`.
        """
        return self.is_probe_step(step) or any(self.is_probe_step(step + dt) for dt in self.dts)

    def _needed_after(self, s: int, now: int) -> bool:
        return any(s + dt > now and self.is_probe_step(s + dt) for dt in self.dts)

    # ---- measuring ----

    def embed(self) -> torch.Tensor:
        """f(x) of the probe images: n x D float32 on the CPU.

        Returns:
            The current model's embeddings (and features, with `split`) of the probe images.
        """
        return self._embed(self._subset).detach().float().cpu()

    def observe(self, step: int) -> dict[int, float] | None:
        """Embed the probe images if `step` needs them, and at a probe step compute D(step; dt).

        Snapshots no later probe step needs are dropped. A step at or before the last one observed is skipped.

        Args:
            step: the global step just completed (or where a phase starts).

        Returns:
            ``{dt: D(step; dt)}`` for the dts whose earlier snapshot exists, at a probe step; None otherwise.
        """
        if step <= self.last or not self.wanted(step):
            return None
        self.last = step
        self.snapshots[step] = self.embed()
        self.current = (step, self.snapshots[step])  # for other observers of this step (xbmcore.memory_view)
        out = None
        if self.is_probe_step(step):
            now, k = self.snapshots[step].double(), self.split
            diffs = {dt: now - self.snapshots[step - dt].double() for dt in self.dts if step - dt in self.snapshots}
            out = {dt: float((d[:, :k] ** 2).sum(1).mean()) for dt, d in diffs.items()}
            entry: dict[str, Any] = {"step": step, "D": out}
            if k is not None:
                entry["D_backbone"] = {dt: float((d[:, k:] ** 2).sum(1).mean()) for dt, d in diffs.items()}
            if min(self.dts) in diffs:
                move = diffs[min(self.dts)][:, :k]
                if self._last_move is not None:
                    entry["cos10"] = float(F.cosine_similarity(move, self._last_move.double(), dim=1).mean())
                self._last_move = move.float()
            self.history.append(entry)
        for s in [s for s in self.snapshots if s != step and not self._needed_after(s, step)]:
            del self.snapshots[s]
        if not self._needed_after(step, step):
            del self.snapshots[step]
        return out

    def value(self, step: int, dt: int) -> float | None:
        """D(step; dt) when it was measured.

        Args:
            step: a probe step.
            dt: one of the probe's dts.

        Returns:
            The value from `history`, or None when it was not measured.
        """
        for h in reversed(self.history):
            if h["step"] == step:
                return h["D"].get(dt)
            if h["step"] < step:
                break
        return None

    # ---- state ----

    def _config(self) -> dict[str, Any]:
        return {"items": self.items.clone(), "every": self.every, "dts": list(self.dts)}

    def state_dict(self) -> dict[str, Any]:
        """The probe's images, interval, dts, snapshots and history, for a checkpoint.

        Returns:
            A plain dict (tensors, numbers, lists; string keys) that the safe unpickler reads.
        """
        return {**self._config(), "last": self.last, "snapshots": dict(self.snapshots), "last_move": self._last_move,
                "history": [{**h, **{f: {str(k): v for k, v in h[f].items()} for f in ("D", "D_backbone") if f in h}}
                            for h in self.history]}

    def load_state_dict(self, state: dict[str, Any] | None) -> bool:
        """Restore snapshots and history; a state of another probe (images, interval, dts) or none is ignored
        (the probe starts afresh, with a warning). Returns whether it was restored.

        Args:
            state: what `state_dict` returned, or None (a checkpoint without a probe).

        Returns:
            True when the state was restored, False when the probe starts afresh.
        """
        mine = self._config()
        if state is None or state["every"] != mine["every"] or list(state["dts"]) != mine["dts"] \
                or not torch.equal(state["items"], mine["items"]):
            if state is not None:
                log.warning("the checkpoint's drift probe has other images, interval or dts: its history is "
                            "dropped and D(t; dt) is measured afresh from here")
            self.snapshots, self.history, self.last, self._last_move = {}, [], -1, None
            return False
        self.last = int(state["last"])
        self.snapshots = {int(k): v for k, v in state["snapshots"].items()}
        self._last_move = state.get("last_move")
        self.history = [{**h, "step": int(h["step"]),
                         **{f: {int(k): float(v) for k, v in h[f].items()} for f in ("D", "D_backbone") if f in h}}
                        for h in state["history"]]
        return True

