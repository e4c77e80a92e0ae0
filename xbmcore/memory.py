"""Cross-batch memory (XBM, Wang et al. CVPR 2020): embeddings of past mini-batches kept for pairing.

The whole state lives in registered buffers, so `state_dict` restores a memory exactly (contents, write
position, fill count, drift statistics) and a resumed run continues as if never interrupted.

Two modes:

- ``"queue"``: the paper's FIFO ring of K entries. Every enqueued embedding is one entry (an image seen twice
  within K entries is stored twice). Entry ``n`` of the stream goes to slot ``n % K``, so the order is exact
  FIFO for any batch size B and any K: when B > K only the newest K of the batch survive, exactly as if the
  batch had been pushed one by one.
- ``"index"``: at most one slot per training image. A stored image that comes again is overwritten in place
  (``feats[slot_of[idx]] = new``) and becomes the newest; a new image takes a free slot, or, once all K slots
  are used, the slot of the least recently written image. With K = num_items every image keeps its own slot
  forever; with K < num_items the memory holds the K most recently seen distinct images (a FIFO of indices).

Drift (the paper's "slow drift") is measured for free: when an image is enqueued while its previous
embedding is still stored, ``||new - old||^2`` and the age ``step_now - step_written`` are recorded. In index
mode the previous embedding is the one overwritten; in queue mode it is the image's newest stored copy, which
needs the item -> slot map that ``num_items`` enables.

Keeping the entries consistent with the model (the entries are the model's past; once the memory term trains
the model, the model moves away from them, docs/results.md):

- drift compensation (``sdc_sigma > 0``; SDC, Yu et al., CVPR 2020): a re-entering image whose previous copy is
  stored gives one observation of the drift, its rate ``(new - written) / age`` at ``new``; the observations
  among the newest ``sdc_pool`` enqueued images are kept, and at every enqueue each stored entry moves by their
  Gaussian-weighted mean rate (weights ``exp(-||entry - at||^2 / (2 sigma^2))``) and is normalised again. The rate is taken from
  the copy as first written (the ``written`` buffer), so the estimate does not feed on its own corrections.
- a refresh (`oldest` then `rewrite`): the caller re-embeds the oldest entries' images with the current model.
- a momentum encoder writes the entries: the trainer's, the memory only stores what it is given.
"""
from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from xbmcore.config import Params

MODES = ("queue", "index")
# memory.dtype's names -> the storage dtypes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CrossBatchMemory(nn.Module):
    """K x D embedding memory with labels, dataset indices and the step each entry was written.

    The entries occupy slots ``[0, len(self))``; `get` returns views of them, `enqueue` writes a batch, `oldest`
    and `rewrite` refresh entries in place. Every piece of state is a registered buffer, so ``state_dict`` /
    ``load_state_dict`` checkpoint and restore the memory exactly.

    Args:
        size: K, the number of entries (an integer >= 1).
        dim: D, the embedding dimension (an integer >= 1); every enqueued batch is B x D.
        mode: ``"queue"``: the paper's FIFO ring, one entry per enqueued row. ``"index"``: at most one slot per
            training image, overwritten in place when the image comes again (needs `num_items`).
        num_items: the training-set size N: dataset indices must lie in ``[0, N)``. Required in index mode;
            optional in queue mode, where it enables the drift measurement (`last_drift`, `mean_drift`) and
            drift compensation. None: no item -> slot map.
        dtype: storage dtype of the stored embeddings: ``torch.float32``, ``torch.bfloat16`` (half the memory) or
            ``torch.float16``. Labels, indices and steps are always int64.
        device: where the buffers live (None: torch's default device). Enqueued tensors must already be there.
        sdc_sigma: width of drift compensation's Gaussian kernel, in embedding-space distance (0: compensation
            off). Needs `num_items`, to find the re-entering images whose drift it measures.
        sdc_pool: how many of the newest enqueued rows compensation keeps as drift observations (>= 1).

    Raises:
        ValueError: a size, dim, num_items or sdc_pool that is not an integer >= 1; an unknown mode or dtype;
            index mode without num_items; a negative sdc_sigma, or sdc_sigma > 0 without num_items.

    Attributes:
        K (int): the number of entries (slots).
        dim (int): D, the embedding dimension.
        mode (str): ``"queue"`` or ``"index"``.
        num_items (int | None): the training-set size, or None.
        sdc_sigma (float): drift compensation's Gaussian width (0: off).
        sdc_pool (int): drift observations compensation averages over.
        feats (Tensor): buffer, K x D in `dtype`: the stored embeddings (valid in slots ``[0, len(self))``).
        labels (Tensor): buffer, K int64: the class label of each entry.
        indices (Tensor): buffer, K int64: the dataset index of each entry.
        steps (Tensor): buffer, K int64: the training step at which each entry was written.
        fill (Tensor): buffer, int64 scalar: the number of entries stored.
        drift_last (Tensor): buffer, 3 float64: [sum ||new - old||^2, sum of ages, count] of the last enqueue.
        drift_total (Tensor): buffer, 3 float64: the same sums over every enqueue since creation or `reset`.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        mode: str = "queue",
        num_items: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        sdc_sigma: float = 0.0,
        sdc_pool: int = 128,
    ) -> None:
        super().__init__()
        if not _is_int(size) or size < 1:
            raise ValueError(f"memory size K: expected an integer >= 1, got {size!r}")
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"memory dim: expected an integer >= 1, got {dim!r}")
        if mode not in MODES:
            raise ValueError(f"memory mode: expected one of {MODES}, got {mode!r}")
        if mode == "index" and num_items is None:
            raise ValueError("memory mode 'index': expected num_items (the training-set size), got None")
        if num_items is not None and (not _is_int(num_items) or num_items < 1):
            raise ValueError(f"memory num_items: expected an integer >= 1 or None, got {num_items!r}")
        if dtype not in DTYPES.values():
            raise ValueError(f"memory dtype: expected one of {tuple(DTYPES.values())}, got {dtype!r}")
        if not sdc_sigma >= 0 or (sdc_sigma > 0 and num_items is None):
            raise ValueError(f"memory sdc_sigma: expected >= 0, and num_items to find re-entering images; got "
                             f"{sdc_sigma!r} with num_items={num_items!r}")
        if not _is_int(sdc_pool) or sdc_pool < 1:
            raise ValueError(f"memory sdc_pool: expected an integer >= 1, got {sdc_pool!r}")
        self.K, self.dim, self.mode = int(size), int(dim), mode
        self.sdc_sigma, self.sdc_pool = float(sdc_sigma), int(sdc_pool)
        self.num_items = None if num_items is None else int(num_items)

        def buf(name: str, *shape: int, dt: torch.dtype = torch.int64, fill: float = 0) -> None:
            self.register_buffer(name, torch.full(shape, fill, dtype=dt, device=device))

        buf("feats", size, dim, dt=dtype)  # K x D
        buf("labels", size)  # K
        buf("indices", size)  # K: dataset index of each entry
        buf("steps", size)  # K: training step at which each entry was written
        buf("fill", fill=0)  # entries stored; they occupy slots [0, fill)
        if mode == "queue":
            buf("ptr", fill=0)  # ring slot of the next write (the oldest entry once full)
        else:
            buf("seq", size)  # K: write order, to find the least recently written slot
        if num_items is not None:
            # item -> slot of its newest copy, -1 if none; in queue mode the slot may since have been
            # overwritten by another item, which the `indices` buffer tells
            buf("slot_of", num_items, fill=-1)
        # drift sums in float64: [sum ||new-old||^2, sum age, count] for the last enqueue and for all
        buf("drift_last", 3, dt=torch.float64)
        buf("drift_total", 3, dt=torch.float64)
        if self.sdc_sigma > 0:
            buf("written", size, dim, dt=torch.float32)  # each entry as first written, before compensation
            # a ring of the newest sdc_pool enqueued rows: where, the drift per step, whether it is an observation
            buf("sdc_at", sdc_pool, dim, dt=torch.float32)
            buf("sdc_rate", sdc_pool, dim, dt=torch.float32)
            buf("sdc_valid", sdc_pool, dt=torch.float32)
            buf("sdc_ptr", fill=0)
        # Python copies of the counters, so the hot path never reads a device tensor (no sync);
        # the buffers above stay the checkpointed truth and are re-read after load_state_dict.
        self._fill = 0
        self._ptr = 0
        self._seq = 0
        self._sdc_ptr = 0

    @classmethod
    def from_ratio(
        cls,
        ratio: float,
        num_items: int,
        dim: int,
        mode: str = "queue",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> CrossBatchMemory:
        """Memory of K = max(1, round(ratio * num_items)) entries, ratio in (0, 1].

        The paper sizes the memory as a fraction of the training set; drift compensation is off.

        Args:
            ratio: K / N, the fraction of the training set the memory holds, in (0, 1].
            num_items: N, the training-set size (an integer >= 1); also the memory's `num_items`.
            dim: D, the embedding dimension.
            mode: ``"queue"`` or ``"index"`` (see the class).
            dtype: storage dtype of the embeddings.
            device: where the buffers live.

        Returns:
            An empty memory of K entries.

        Raises:
            ValueError: ratio outside (0, 1], num_items not an integer >= 1, or an invalid argument of the class.
        """
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"memory ratio: expected a value in (0, 1], got {ratio!r}")
        if not _is_int(num_items) or num_items < 1:
            raise ValueError(f"memory num_items: expected an integer >= 1, got {num_items!r}")
        size = max(1, round(ratio * int(num_items)))
        return cls(size, dim, mode=mode, num_items=num_items, dtype=dtype, device=device)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return self._fill

    @property
    def fill_level(self) -> float:
        """Fraction of the K slots in use, ``len(self) / K``: 0 when empty, 1 once full (no device read)."""
        return self._fill / self.K

    def get(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views (no copy) of the stored entries: feats n x D, labels n, indices n, with n = len(self).

        Entries occupy slots [0, n). The order is by slot, not by age: in queue mode the oldest entry is at
        slot ``ptr`` once the ring is full; in index mode the age order is given by ``seq``.

        Returns:
            ``(feats, labels, indices)``: n x D in the storage dtype, n int64 class labels, n int64 dataset
                indices. Views of the buffers: a later `enqueue` or `rewrite` changes them.
        """
        n = self._fill
        return self.feats[:n], self.labels[:n], self.indices[:n]

    def _drift_mean(self, sums: Tensor, which: int) -> float | None:
        count = float(sums[2])
        return None if count == 0 else float(sums[which]) / count

    @property
    def last_drift(self) -> float | None:
        """Mean ||new - old||^2 over the items of the last enqueue whose previous embedding was stored; None when
        none was (or without `num_items`, which finds them)."""
        return self._drift_mean(self.drift_last, 0)

    @property
    def last_drift_age(self) -> float | None:
        """Mean age in steps (step now - step written) of the previous embeddings behind `last_drift`; None when
        there were none."""
        return self._drift_mean(self.drift_last, 1)

    @property
    def mean_drift(self) -> float | None:
        """Running mean of ||new - old||^2 over every re-entering item since creation (or reset); None before any
        image has re-entered."""
        return self._drift_mean(self.drift_total, 0)

    @property
    def mean_drift_age(self) -> float | None:
        """Running mean age in steps (step now - step written) of the replaced embeddings behind `mean_drift`;
        None before any image has re-entered."""
        return self._drift_mean(self.drift_total, 1)

    def extra_repr(self) -> str:
        """The memory's configuration in ``repr(memory)``: K, dim, mode, num_items and dtype."""
        return f"K={self.K}, dim={self.dim}, mode={self.mode}, num_items={self.num_items}, dtype={self.feats.dtype}"

    # ------------------------------------------------------------------ writing

    def reset(self) -> None:
        """Empty the memory, its drift statistics and observations (shapes, dtype and device are kept)."""
        for name, value in self.named_buffers(recurse=False):
            value.fill_(-1 if name == "slot_of" else 0)
        self._fill = self._ptr = self._seq = self._sdc_ptr = 0

    @torch.no_grad()
    def enqueue(self, feats: Tensor, labels: Tensor, indices: Tensor, step: int, check_range: bool = True) -> None:
        """Store a batch (feats B x D, labels B, indices B) written at training `step`; detaches.

        Duplicate indices in one batch: the last occurrence wins (it is the one used for drift and, in index
        mode, the one stored). With num_items set, the index range is validated (one host-device sync: an
        out-of-range index would corrupt slot_of); `check_range=False` skips that for a caller whose indices
        are valid by construction (the trainer's, drawn by its sampler). Queue mode then runs without any
        sync; index mode needs one to count the new images.

        With `num_items`, the drift of the re-entering images is recorded (`last_drift`, `mean_drift`) and,
        with ``sdc_sigma > 0``, every stored entry is compensated before the batch is written.

        Args:
            feats: B x D floating-point embeddings (any float dtype: cast to the storage dtype), on the
                memory's device. Detached: no gradient flows into the memory.
            labels: B integer class labels.
            indices: B integer dataset indices of the images (in ``[0, num_items)`` when num_items is set): what
                identifies an image across batches (index mode's slots, drift, the losses' self-pair exclusion).
            step: the training step the embeddings were computed at (an int); stored per entry, ages count from
                it.
            check_range: validate that `indices` lie in ``[0, num_items)`` (one host-device sync). False for a
                caller whose indices are valid by construction.

        Raises:
            ValueError: a tensor that is not a tensor, on another device, of the wrong shape (feats B x D, labels
                and indices B) or dtype (floating feats, integer labels and indices); a step that is not an int;
                indices out of range (with `check_range`).
        """
        feats, labels, indices = self._check(feats, labels, indices, step, check_range)
        B = feats.shape[0]
        if B == 0:
            return
        last = is_last = None
        if self.num_items is not None:
            last = _last_position(indices)  # B
            is_last = last == torch.arange(B, device=last.device)  # the distinct items, in batch order
            stored, prev = self._record_drift(feats, indices, is_last, step)
            if self.sdc_sigma > 0:
                self._compensate(feats, stored, prev, step)
        if self.mode == "queue":
            self._enqueue_queue(feats, labels, indices, step, last)
        else:
            self._enqueue_index(feats[is_last], labels[is_last], indices[is_last], step)

    def _enqueue_queue(
        self, feats: Tensor, labels: Tensor, indices: Tensor, step: int, last: Tensor | None
    ) -> None:
        B, K = feats.shape[0], self.K
        n = min(B, K)  # when B > K only the newest K entries survive the push
        slots = (self._ptr + (B - n) + torch.arange(n, device=feats.device)) % K  # n distinct slots
        self._write(slots, feats[B - n :], labels[B - n :], indices[B - n :], step)
        if last is not None:  # the item -> slot map exists
            # newest copy of each item; duplicates of an item all write the slot of its last occurrence,
            # so the scatter is deterministic whatever the order the backend applies it in (an item whose
            # last occurrence fell outside the newest K rows gets -1: the ring holds no copy of it)
            slot_of_row = torch.full((B,), -1, dtype=torch.int64, device=feats.device)
            slot_of_row[B - n :] = slots
            self.slot_of[indices] = slot_of_row[last]
        self._ptr = (self._ptr + B) % K
        self._fill = min(self._fill + B, K)
        self.ptr.fill_(self._ptr)
        self.fill.fill_(self._fill)

    def _enqueue_index(self, feats: Tensor, labels: Tensor, indices: Tensor, step: int) -> None:
        # feats, labels, indices: the n distinct items of the batch, in batch order (older first)
        K = self.K
        if feats.shape[0] > K:  # more distinct images than slots: keep the newest K
            feats, labels, indices = feats[-K:], labels[-K:], indices[-K:]
        n = feats.shape[0]
        slots = self.slot_of[indices]  # n, -1 where not stored
        new = slots < 0
        num_new = int(new.sum())  # the one sync: how many slots to allocate
        # updated items become the newest first, so that eviction below never picks one of them
        self.seq[slots[~new]] = self._seq + torch.arange(n, device=feats.device)[~new]
        num_free = min(num_new, K - self._fill)
        fresh = torch.arange(self._fill, self._fill + num_free, device=feats.device)
        if num_new > num_free:  # evict the least recently written images
            victims = torch.topk(self.seq[: self._fill], num_new - num_free, largest=False).indices
            self.slot_of[self.indices[victims]] = -1
            fresh = torch.cat([fresh, victims])
        slots[new] = fresh
        self._write(slots, feats, labels, indices, step)
        self.seq[slots] = self._seq + torch.arange(n, device=feats.device)
        self.slot_of[indices] = slots
        self._seq += n
        self._fill += num_free
        self.fill.fill_(self._fill)

    def _write(self, slots: Tensor, feats: Tensor, labels: Tensor, indices: Tensor, step: int) -> None:
        self.feats.index_copy_(0, slots, feats.to(self.feats.dtype))
        if self.sdc_sigma > 0:
            self.written.index_copy_(0, slots, feats.float())
        self.labels.index_copy_(0, slots, labels.to(torch.int64))
        self.indices.index_copy_(0, slots, indices.to(torch.int64))
        self.steps.index_fill_(0, slots, step)

    def _record_drift(self, feats: Tensor, indices: Tensor, is_last: Tensor, step: int) -> None:
        # previous copy still stored <=> the item's slot still holds that item (queue slots get overwritten)
        slot = self.slot_of[indices]  # B
        prev = slot.clamp(min=0)
        stored = (slot >= 0) & (self.indices[prev] == indices) & is_last
        sq = (feats.float() - self.feats[prev].float()).pow(2).sum(1)  # B
        age = step - self.steps[prev]  # B
        sums = [torch.where(stored, x.double(), 0.0).sum() for x in (sq, age)]
        self.drift_last.copy_(torch.stack([*sums, stored.sum().double()]))
        self.drift_total.add_(self.drift_last)
        return stored, prev

    def _compensate(self, feats: Tensor, stored: Tensor, prev: Tensor, step: int) -> None:
        """SDC: the batch's rows join the ring of the newest `sdc_pool` enqueued rows (a row is an observation
        when its image's previous copy was stored), then every stored entry moves by the Gaussian-weighted mean
        drift rate of the ring's observations (one step's worth) and is renormalised. No host-device sync."""
        B, P = feats.shape[0], self.sdc_pool
        n = min(B, P)
        age = (step - self.steps[prev]).clamp(min=1).to(torch.float32)  # B
        rate = (feats.float() - self.written[prev]) / age[:, None]  # B x D
        slots = (self._sdc_ptr + torch.arange(n, device=feats.device)) % P  # the newest n rows' ring slots
        self.sdc_at.index_copy_(0, slots, feats[B - n:].float())
        self.sdc_rate.index_copy_(0, slots, rate[B - n:])
        self.sdc_valid.index_copy_(0, slots, stored[B - n:].to(torch.float32))
        self._sdc_ptr = (self._sdc_ptr + n) % P
        self.sdc_ptr.fill_(self._sdc_ptr)
        if self._fill:
            k = self._fill
            self.feats[:k] = compensate(self.feats[:k].float(), self.sdc_at, self.sdc_rate, self.sdc_valid,
                                        self.sdc_sigma).to(self.feats.dtype)

    # ------------------------------------------------------------------ refreshing

    def oldest(self, n: int, skip_next: int = 0) -> Tensor:
        """Slots of n stored entries written longest ago (by the step they were written; among entries of one step,
        whichever torch.topk returns), oldest first. skip_next: in queue mode, leave out the next `skip_next` ring
        slots, which the next enqueue of that many entries overwrites anyway (a refresh of them would be lost).

        Args:
            n: how many slots to return; capped at the entries stored (minus the skipped ones).
            skip_next: in queue mode with a full ring, the number of upcoming ring slots to leave out (the next
                enqueue's batch size); ignored in index mode and while the ring is not full.

        Returns:
            At most n int64 slot numbers on the memory's device, oldest entry first: what `rewrite` takes.
        """
        steps = self.steps[: self._fill]
        if self.mode == "queue" and skip_next and self._fill == self.K:
            skip = (self._ptr + torch.arange(min(int(skip_next), self.K), device=steps.device)) % self.K
            steps = steps.clone()
            steps[skip] = torch.iinfo(steps.dtype).max
            n = min(int(n), self._fill - len(skip))
        n = min(int(n), self._fill)
        return torch.topk(steps, n, largest=False, sorted=True).indices

    @torch.no_grad()
    def rewrite(self, slots: Tensor, feats: Tensor, step: int) -> None:
        """New embeddings for the entries in `slots` (the same images, re-embedded at `step`): the features and the
        step stamps change; labels, dataset indices and the write order (who is evicted next) do not.

        Args:
            slots: n int64 slot numbers of stored entries (from `oldest`), on the memory's device.
            feats: n x D new embeddings of those entries' images, in the order of `slots`; detached.
            step: the training step they were computed at: the entries' new age origin.
        """
        self.feats.index_copy_(0, slots, feats.detach().to(self.feats.dtype))
        self.steps.index_fill_(0, slots, step)
        if self.sdc_sigma > 0:
            self.written.index_copy_(0, slots, feats.detach().float())

    def _check(self, feats: Tensor, labels: Tensor, indices: Tensor, step: int,
               check_range: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        for name, t in (("feats", feats), ("labels", labels), ("indices", indices)):
            if not isinstance(t, Tensor):
                raise ValueError(f"enqueue {name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.device != self.feats.device:
                raise ValueError(f"enqueue {name}: expected a tensor on {self.feats.device}, got {t.device}")
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"enqueue feats: expected shape B x {self.dim}, got {tuple(feats.shape)}")
        if not feats.is_floating_point():
            raise ValueError(f"enqueue feats: expected a floating-point tensor, got {feats.dtype}")
        B = feats.shape[0]
        for name, t in (("labels", labels), ("indices", indices)):
            if t.shape != (B,):
                raise ValueError(f"enqueue {name}: expected shape ({B},) to match feats, got {tuple(t.shape)}")
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"enqueue {name}: expected an integer tensor, got {t.dtype}")
        if not _is_int(step):
            raise ValueError(f"enqueue step: expected an int, got {type(step).__name__}")
        if check_range and self.num_items is not None and B > 0:
            lo, hi = torch.aminmax(indices)
            lo, hi = int(lo), int(hi)  # one sync: an out-of-range index would corrupt slot_of
            if lo < 0 or hi >= self.num_items:
                raise ValueError(
                    f"enqueue indices: expected values in [0, {self.num_items}) (num_items), got range [{lo}, {hi}]"
                )
        return feats.detach(), labels, indices.long()

    # ------------------------------------------------------------------ checkpoints

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fill = int(self.fill)
        if self.sdc_sigma > 0:
            self._sdc_ptr = int(self.sdc_ptr)
        if self.mode == "queue":
            self._ptr = int(self.ptr)
        else:
            self._seq = int(self.seq[: self._fill].max()) + 1 if self._fill else 0


def build_memory(params: Params, num_items: int, dim: int, device: torch.device | str) -> CrossBatchMemory:
    """The (empty) memory the `memory` section describes, for a train set of `num_items` images.

    Args:
        params: the run's params; its `memory` section gives the size (``memory.size``, else
            ``round(memory.ratio * num_items)``), mode, dtype and drift compensation.
        num_items: N, the training-set size.
        dim: D, the width of an entry (the embedding's, or the backbone's with ``memory.store: features``).
        device: where the buffers live.

    Returns:
        An empty CrossBatchMemory.
    """
    m = params.memory
    size = m.size if m.size is not None else max(1, round(m.ratio * int(num_items)))
    return CrossBatchMemory(size, dim, mode=m.mode, num_items=num_items, dtype=DTYPES[m.dtype], device=device,
                            sdc_sigma=m.sdc_sigma, sdc_pool=m.sdc_pool)


def compensate(feats: Tensor, at: Tensor, rate: Tensor, valid: Tensor, sigma: float) -> Tensor:
    """SDC's update of stored embeddings: each row of `feats` (n x D) plus the Gaussian-weighted mean of the
    observed drift rates (`rate`, P x D, observed at `at`, P x D; `valid`, P, 1 for a real observation and 0 for
    an empty pool slot), renormalised to unit length. Rows with no valid observation stay where they are.

    Args:
        feats: n x D float32 stored embeddings to move.
        at: P x D float32: where each drift observation was made (the re-entering image's new embedding).
        rate: P x D float32: each observation's drift per step, ``(new - written) / age``.
        valid: P float32: 1 for a real observation, 0 for an empty or non-observation pool slot.
        sigma: the Gaussian kernel's width (> 0): observation j weighs ``exp(-||feats_i - at_j||^2 / (2 sigma^2))``.

    Returns:
        n x D float32, unit-norm rows: the compensated embeddings.
    """
    d2 = (feats * feats).sum(1, keepdim=True) - 2 * feats @ at.T + (at * at).sum(1)[None, :]  # n x P
    logits = -d2.clamp(min=0) / (2 * sigma * sigma)
    logits = logits.masked_fill(valid[None, :] == 0, -torch.inf)
    # softmax = the normalised Gaussian weights, stable for a narrow sigma; all -inf (no observation) -> 0
    w = torch.nan_to_num(torch.softmax(logits, 1), nan=0.0)
    return torch.nn.functional.normalize(feats + w @ rate, dim=1)


def _last_position(indices: Tensor) -> Tensor:
    """For each row, the position of the last row of the batch with the same index (sort-based, no sync)."""
    B = indices.shape[0]
    pos = torch.arange(B, device=indices.device)
    sorted_idx, perm = torch.sort(indices, stable=True)  # equal indices: consecutive, in batch order
    is_end = torch.ones(B, dtype=torch.bool, device=indices.device)  # last of its run of equal indices
    is_end[:-1] = sorted_idx[1:] != sorted_idx[:-1]
    run_end = torch.where(is_end, pos, B).flip(0).cummin(0).values.flip(0)  # next run end at or after k
    last = torch.empty_like(perm)
    last[perm] = perm[run_end]
    return last


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)
