"""P x M batch sampler: every batch holds P classes with M images each, so every anchor has positives.

The stream is a pure function of (seed, epoch, batch): an epoch is one pass over a seeded permutation of the
classes in chunks of P, and the M images of a class in a batch are drawn from a generator seeded by
(seed, epoch, batch). Resuming therefore needs only the position, not a pickled RNG.

With several ranks each one draws the same global batch and keeps its own contiguous part (rank r: rows
r * B / world to (r + 1) * B / world, whole classes when B / world is a multiple of M), so gathered in rank order
the parts are exactly the batch one process with the global batch size and seed would draw.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class PKSampler(torch.utils.data.Sampler[list[int]]):
    """Infinite batch sampler of P classes x M images (P = batch_size // images_per_class, M = images_per_class).

    Per epoch the classes are permuted (seeded by (seed, epoch)) and cut into chunks of P. When the number of
    classes C is not a multiple of P, the last chunk is filled with classes drawn without replacement from the
    other classes of the epoch (same generator), so every class is seen at least once per epoch and every epoch
    has the same length, ``len_epoch = ceil(C / P)`` batches. Within a batch the M images of a class are drawn
    without replacement when the class has at least M images, with replacement otherwise.

    ``state_dict()`` gives the position of the next batch; ``load_state_dict`` resumes there, and the next batch
    is identical to the one an uninterrupted run would yield. Because epochs have a fixed length, the position
    after n batches is also ``state_after(n)``: use it when a DataLoader with workers prefetches batches ahead of
    the training step.

    Args:
        labels: the class label of every dataset item (a 1-D sequence of integers, N >= 1); any integer ids, not
            necessarily contiguous. A batch holds dataset indices into it.
        batch_size: B, the global batch size: a multiple of `images_per_class` and of `world`.
        images_per_class: M, the images drawn per class; P = B / M classes per batch (P <= the number of classes).
        seed: the stream's seed (an integer >= 0): the classes' order per epoch and the images drawn per batch.
        rank: this process's rank in ``[0, world)``: it keeps rows ``rank * B / world`` to
            ``(rank + 1) * B / world`` of each global batch.
        world: the number of ranks sharing the global batch (1: one process).

    Raises:
        ValueError: empty or non-integer labels; a batch size, images_per_class or seed that is not an integer
            (or is out of range); B not a multiple of M or of world; rank outside [0, world); more classes per
            batch than the labels hold.

    Attributes:
        batch_size (int): B, the global batch size.
        P (int): classes per batch.
        M (int): images per class in a batch.
        seed (int): the stream's seed.
        num_classes (int): C, the distinct labels.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, batch_size: int, images_per_class: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"labels: expected a non-empty 1-D sequence of integers, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels: expected integers, got dtype {labels.dtype}")
        for name, v in (("batch_size", batch_size), ("images_per_class", images_per_class), ("seed", seed)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"{name}: expected an integer, got {v!r}")
        if seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed}")
        if images_per_class < 1 or batch_size < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and images_per_class ({images_per_class}) must both be >= 1"
            )
        if batch_size % images_per_class:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of images_per_class ({images_per_class})"
            )
        if not 0 <= rank < world or batch_size % world:
            raise ValueError(f"rank {rank} of world {world}: expected 0 <= rank < world and the global batch_size "
                             f"({batch_size}) a multiple of world")
        classes, inverse = np.unique(labels, return_inverse=True)
        P = batch_size // images_per_class
        if P > len(classes):
            raise ValueError(
                f"batch_size // images_per_class = {batch_size} // {images_per_class} = {P} classes per batch, "
                f"but labels hold only {len(classes)} classes"
            )
        self.batch_size = int(batch_size)
        self.P = P
        self.M = int(images_per_class)
        self.seed = int(seed)
        self.rank, self.world = int(rank), int(world)
        self.num_classes = len(classes)
        # _items[c]: dataset indices of class c (c = position of the label in the sorted unique labels).
        order = np.argsort(inverse, kind="stable")
        self._items = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        self._epoch = 0
        self._batch = 0

    @property
    def len_epoch(self) -> int:
        """Batches per epoch: ceil(C / P)."""
        return -(-self.num_classes // self.P)

    def _epoch_classes(self, epoch: int) -> np.ndarray:
        # len_epoch x P class ids; the last row is completed with classes not already in it.
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.num_classes)
        short = self.len_epoch * self.P - self.num_classes
        if short:
            tail = perm[len(perm) - (self.P - short):]
            others = np.setdiff1d(np.arange(self.num_classes), tail, assume_unique=True)
            perm = np.concatenate([perm, rng.choice(others, size=short, replace=False)])
        return perm.reshape(self.len_epoch, self.P)

    def _batch_indices(self, epoch: int, batch: int, classes: np.ndarray) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch, batch])
        out = []
        for c in classes:
            items = self._items[c]
            pick = rng.choice(len(items), size=self.M, replace=len(items) < self.M)
            out.append(items[pick])
        return np.concatenate(out).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        # Continues from the current position; the counters move before each yield so that state_dict(),
        # read after a batch was received, points at the next one.
        epoch, rows = self._epoch, self._epoch_classes(self._epoch)
        while True:
            if self._epoch != epoch:
                epoch, rows = self._epoch, self._epoch_classes(self._epoch)
            b = self._batch
            batch = self._batch_indices(epoch, b, rows[b])
            self._epoch, self._batch = (epoch, b + 1) if b + 1 < self.len_epoch else (epoch + 1, 0)
            part = self.batch_size // self.world
            yield batch[self.rank * part:(self.rank + 1) * part]

    def state_after(self, num_batches: int) -> dict[str, int]:
        """Position after `num_batches` batches from the start of the stream.

        Args:
            num_batches: batches drawn since the start of the stream (the trainer's global step).

        Returns:
            A state for `load_state_dict`: ``{"epoch", "batch", "seed"}``.
        """
        return {"epoch": num_batches // self.len_epoch, "batch": num_batches % self.len_epoch, "seed": self.seed}

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch.

        Returns:
            ``{"epoch": ..., "batch": ..., "seed": ...}``: the next batch is batch `batch` of epoch `epoch`.
        """
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position: the next batch is the one an uninterrupted stream yields there.

        Args:
            state: a position from `state_dict` or `state_after`: ``{"epoch", "batch", "seed"}``.

        Raises:
            ValueError: a missing key, or a position outside the stream (epoch < 0, batch not in
                ``[0, len_epoch)``).
        """
        missing = {"epoch", "batch", "seed"} - set(state)
        if missing:
            raise ValueError(f"PKSampler state: missing keys {sorted(missing)}, got {sorted(state)}")
        if not 0 <= state["batch"] < self.len_epoch or state["epoch"] < 0:
            raise ValueError(
                f"PKSampler state: expected epoch >= 0 and 0 <= batch < len_epoch ({self.len_epoch}), "
                f"got epoch {state['epoch']}, batch {state['batch']}"
            )
        self.seed = int(state["seed"])
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
