"""CrossBatchMemory against plain-Python reference simulations (a ring list and an LRU dict).

Features are small integers, exact in float32 and bfloat16, so contents and drift are compared exactly.
"""
from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn

from xbmcore.memory import CrossBatchMemory

DTYPES = [torch.float32, torch.bfloat16]


def batches(seed, count, max_b, num_items, D=3):
    """Random batches (feats, labels, indices, step) with random sizes and repeated indices."""
    g = torch.Generator().manual_seed(seed)
    for step in range(count):
        B = int(torch.randint(1, max_b + 1, (), generator=g))
        idx = torch.randint(0, num_items, (B,), generator=g)
        feats = torch.randint(-20, 21, (B, D), generator=g).float()
        yield feats, idx % 5, idx, step  # label derived from the item, as in a dataset


# ---------------------------------------------------------------------- reference simulations


class RefRing:
    """The paper's FIFO, entry by entry: the n-th entry ever written goes to slot n % K."""

    def __init__(self, K):
        self.K, self.n, self.slots = K, 0, {}

    def push(self, feats, labels, indices, step):
        drift = self._drift(feats, indices, step)
        for f, y, i in zip(feats.tolist(), labels.tolist(), indices.tolist()):
            self.slots[self.n % self.K] = (f, y, i, step, self.n)
            self.n += 1
        return drift

    def newest(self, item):
        copies = [e for e in self.slots.values() if e[2] == item]
        return max(copies, key=lambda e: e[4]) if copies else None

    def _drift(self, feats, indices, step):
        out = []
        last = {i: r for r, i in enumerate(indices.tolist())}  # last occurrence wins
        for item, r in sorted(last.items(), key=lambda kv: kv[1]):
            old = self.newest(item)
            if old is not None:
                out.append((sum((a - b) ** 2 for a, b in zip(feats[r].tolist(), old[0])), step - old[3]))
        return out


class RefLRU:
    """Index mode: the K most recently seen distinct items; a re-entering item is updated and becomes newest."""

    def __init__(self, K):
        self.K, self.d = K, OrderedDict()

    def push(self, feats, labels, indices, step):
        last = {i: r for r, i in enumerate(indices.tolist())}
        order = sorted(last, key=last.get)
        drift = [
            (sum((a - b) ** 2 for a, b in zip(feats[last[i]].tolist(), self.d[i][0])), step - self.d[i][2])
            for i in order
            if i in self.d
        ]
        for i in order[-self.K :]:
            self.d.pop(i, None)
            self.d[i] = (feats[last[i]].tolist(), int(labels[last[i]]), step)
            if len(self.d) > self.K:
                self.d.popitem(last=False)
        return drift


def mean_or_none(xs):
    return sum(xs) / len(xs) if xs else None


def stored_by_item(mem):
    feats, labels, indices = mem.get()
    steps = mem.steps[: len(mem)]
    return {int(i): (f.float().tolist(), int(y), int(s)) for f, y, i, s in zip(feats, labels, indices, steps)}


# ---------------------------------------------------------------------- queue mode


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 7, 12])
def test_queue_is_exact_fifo_for_any_batch_size(dtype, K):
    """Random B from 1 to 2K + 3 (K not a multiple of B, B > K): slots, fill, pointer and drift match."""
    mem = CrossBatchMemory(K, 3, mode="queue", num_items=30, dtype=dtype)
    ref = RefRing(K)
    all_drift = []
    for feats, labels, indices, step in batches(K, 40, 2 * K + 3, 30):
        drift = ref.push(feats, labels, indices, step)
        mem.enqueue(feats, labels, indices, step)
        all_drift += drift
        n = min(ref.n, K)
        assert len(mem) == n and int(mem.fill) == n and mem.fill_level == n / K
        assert int(mem.ptr) == ref.n % K
        f, y, i = mem.get()
        for slot in range(n):
            rf, ry, ri, rstep, _ = ref.slots[slot]
            assert f[slot].float().tolist() == rf and int(y[slot]) == ry and int(i[slot]) == ri
            assert int(mem.steps[slot]) == rstep
        for item in set(indices.tolist()):  # the item map points at the newest copy, -1 if none survived
            newest = ref.newest(item)
            assert int(mem.slot_of[item]) == (newest[4] % K if newest else -1)
        assert mem.last_drift == mean_or_none([d for d, _ in drift])
        assert mem.last_drift_age == mean_or_none([a for _, a in drift])
    assert mem.mean_drift == pytest.approx(mean_or_none([d for d, _ in all_drift]), rel=1e-12)
    assert mem.mean_drift_age == pytest.approx(mean_or_none([a for _, a in all_drift]), rel=1e-12)
    assert all_drift  # the stream exercised re-entering items


def test_queue_chronological_order_and_batch_larger_than_memory():
    mem = CrossBatchMemory(5, 1)
    col = lambda *v: torch.tensor(v, dtype=torch.float32)[:, None]  # noqa: E731
    mem.enqueue(col(0, 1, 2), torch.zeros(3, dtype=torch.long), torch.arange(3), step=0)
    assert mem.get()[0].flatten().tolist() == [0, 1, 2]
    mem.enqueue(col(3, 4, 5, 6, 7, 8, 9), torch.zeros(7, dtype=torch.long), torch.arange(3, 10), step=1)
    # pushed one by one: 8 writes after the first 3 -> slots hold 5..9, the oldest (5) at ptr = 10 % 5 = 0
    assert mem.get()[0].flatten().tolist() == [5, 6, 7, 8, 9] and int(mem.ptr) == 0
    mem.enqueue(col(10, 11), torch.zeros(2, dtype=torch.long), torch.arange(2), step=2)
    feats = mem.get()[0].flatten()
    ptr = int(mem.ptr)
    chronological = [feats[(ptr + j) % 5].item() for j in range(5)]
    assert chronological == [7, 8, 9, 10, 11]


def test_get_returns_views_without_copy():
    mem = CrossBatchMemory(6, 2, num_items=10)
    mem.enqueue(torch.ones(4, 2), torch.zeros(4, dtype=torch.long), torch.arange(4), step=0)
    feats, labels, indices = mem.get()
    assert feats.shape == (4, 2) and feats.data_ptr() == mem.feats.data_ptr() and feats._base is mem.feats
    assert labels._base is mem.labels and indices._base is mem.indices


def test_queue_drift_by_hand():
    mem = CrossBatchMemory(4, 2, mode="queue", num_items=10)
    t = lambda *rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731
    i = lambda *v: torch.tensor(v)  # noqa: E731
    mem.enqueue(t([1, 0], [0, 1]), i(0, 1), i(0, 1), step=0)  # slots 0, 1
    assert mem.last_drift is None and mem.mean_drift is None
    mem.enqueue(t([0, 3], [1, 1]), i(1, 2), i(1, 2), step=3)  # item 1: |(0,3)-(0,1)|^2 = 4, age 3
    assert (mem.last_drift, mem.last_drift_age) == (4.0, 3.0)
    # item 0: |(2,0)-(1,0)|^2 = 1, age 5; item 1 twice, the last wins: |(0,0)-(0,3)|^2 = 9, age 2
    mem.enqueue(t([2, 0], [9, 9], [0, 0]), i(0, 1, 1), i(0, 1, 1), step=5)  # slots 0, 1, 2
    assert (mem.last_drift, mem.last_drift_age) == (5.0, 3.5)
    assert mem.mean_drift == pytest.approx(14 / 3) and mem.mean_drift_age == pytest.approx(10 / 3)
    mem.enqueue(t([5, 5]), i(3), i(3), step=6)  # slot 3: overwrites item 2's only copy
    assert mem.last_drift is None and mem.mean_drift == pytest.approx(14 / 3)
    mem.enqueue(t([1, 2]), i(2), i(2), step=7)  # item 2 is no longer stored: no drift
    assert mem.last_drift is None
    mem.enqueue(t([0, 1]), i(1), i(1), step=8)  # item 1's newest copy: (0,0) written at step 5
    assert (mem.last_drift, mem.last_drift_age) == (1.0, 3.0)
    assert mem.mean_drift == pytest.approx(15 / 4) and mem.mean_drift_age == pytest.approx(13 / 4)


def test_queue_without_num_items_has_no_drift():
    mem = CrossBatchMemory(4, 2)
    for step in range(3):
        mem.enqueue(torch.randn(2, 2), torch.zeros(2, dtype=torch.long), torch.arange(2), step)
    assert mem.last_drift is None and mem.mean_drift is None and "slot_of" not in mem.state_dict()


# ---------------------------------------------------------------------- index mode


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 6, 20])
def test_index_mode_matches_lru_of_items(dtype, K):
    """K < num_items: the K most recently seen distinct items; K = num_items: every item keeps its slot."""
    num_items = 20
    mem = CrossBatchMemory(K, 3, mode="index", num_items=num_items, dtype=dtype)
    ref = RefLRU(K)
    slot_seen = {}
    for feats, labels, indices, step in batches(K + 100, 40, 2 * K + 3, num_items):
        before = {int(i): int(mem.slot_of[i]) for i in indices if int(mem.slot_of[i]) >= 0}
        drift = ref.push(feats, labels, indices, step)
        mem.enqueue(feats, labels, indices, step)
        assert stored_by_item(mem) == dict(ref.d)
        assert len(mem) == len(ref.d) and int(mem.fill) == len(ref.d)
        for item, slot in before.items():  # updated in place: same slot
            if item in ref.d:
                assert int(mem.slot_of[item]) == slot
        stored = mem.get()[2].tolist()
        assert len(set(stored)) == len(stored)  # one slot per item
        for item in range(num_items):
            s = int(mem.slot_of[item])
            assert (s >= 0) == (item in ref.d) and (s < 0 or stored[s] == item)
            if K == num_items and s >= 0:
                assert slot_seen.setdefault(item, s) == s  # never moves
        assert mem.last_drift == mean_or_none([d for d, _ in drift])
        assert mem.last_drift_age == mean_or_none([a for _, a in drift])


def test_index_mode_by_hand():
    mem = CrossBatchMemory(3, 2, mode="index", num_items=10)
    t = lambda *rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731
    i = lambda *v: torch.tensor(v)  # noqa: E731
    mem.enqueue(t([1, 1], [2, 2]), i(0, 1), i(4, 7), step=0)  # 4 -> slot 0, 7 -> slot 1
    mem.enqueue(t([2, 4], [3, 3]), i(1, 2), i(7, 9), step=1)  # 7 in place (drift 4, age 1), 9 -> slot 2
    assert mem.get()[2].tolist() == [4, 7, 9] and mem.get()[0][1].tolist() == [2, 4]
    assert (mem.last_drift, mem.last_drift_age, len(mem)) == (4.0, 1.0, 3)
    mem.enqueue(t([5, 5]), i(3), i(5), step=2)  # full: least recently written is 4 -> evicted
    assert mem.get()[2].tolist() == [5, 7, 9] and int(mem.slot_of[4]) == -1
    mem.enqueue(t([6, 6]), i(0), i(4), step=3)  # 4 comes back as new (no drift), evicting 7 (written at step 1)
    assert mem.get()[2].tolist() == [5, 4, 9] and mem.last_drift is None and int(mem.slot_of[7]) == -1
    mem.enqueue(t([0, 0], [9, 9]), i(2, 2), i(9, 9), step=4)  # duplicates: the last wins
    assert mem.get()[0][2].tolist() == [9, 9] and (mem.last_drift, mem.last_drift_age) == (72.0, 3.0)


# ---------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("mode", ["queue", "index"])
def test_state_dict_round_trip_mid_wrap(mode):
    """Save mid-wrap, load into a fresh memory (inside a parent module), continue: identical to uninterrupted."""
    stream = list(batches(7, 30, 9, 25))
    a = CrossBatchMemory(11, 3, mode=mode, num_items=25)
    for b in stream[:13]:
        a.enqueue(*b)
    assert 0 < int(a.fill) and (mode == "index" or int(a.ptr) != 0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    parent = nn.ModuleDict({"memory": CrossBatchMemory(11, 3, mode=mode, num_items=25)})
    parent.load_state_dict({f"memory.{k}": v for k, v in torch.load(buf).items()})
    b = parent["memory"]
    assert len(b) == len(a) and b.last_drift == a.last_drift and b.mean_drift == a.mean_drift
    for batch in stream[13:]:
        a.enqueue(*batch)
        b.enqueue(*batch)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (len(a), a.mean_drift, a.mean_drift_age) == (len(b), b.mean_drift, b.mean_drift_age)


def test_state_dict_holds_every_counter():
    mem = CrossBatchMemory(4, 2, num_items=8)
    keys = set(mem.state_dict())
    assert {"feats", "labels", "indices", "steps", "ptr", "fill", "slot_of", "drift_last", "drift_total"} <= keys
    assert {"seq", "fill", "slot_of"} <= set(CrossBatchMemory(4, 2, mode="index", num_items=8).state_dict())


def test_reset_empties_everything():
    mem = CrossBatchMemory(4, 2, num_items=8)
    copy_ = copy.deepcopy(mem.state_dict())
    for b in batches(0, 5, 3, 8, D=2):
        mem.enqueue(*b)
    mem.reset()
    assert len(mem) == 0 and mem.mean_drift is None
    assert all(torch.equal(v, copy_[k]) for k, v in mem.state_dict().items())


# ---------------------------------------------------------------------- construction and bad input


def test_from_ratio():
    assert CrossBatchMemory.from_ratio(0.5, 11, 4).K == round(5.5)
    assert CrossBatchMemory.from_ratio(0.001, 100, 4).K == 1
    m = CrossBatchMemory.from_ratio(1.0, 30, 4, mode="index", dtype=torch.bfloat16)
    assert (m.K, m.mode, m.num_items, m.feats.dtype, m.fill_level) == (30, "index", 30, torch.bfloat16, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_storage_dtype(dtype):
    mem = CrossBatchMemory(3, 2, dtype=dtype)
    mem.enqueue(torch.tensor([[0.5, 1.5]]), torch.tensor([1]), torch.tensor([0]), step=0)
    assert mem.feats.dtype == dtype and mem.get()[0].tolist() == [[0.5, 1.5]]


def test_bad_inputs_raise_value_errors():
    mem = CrossBatchMemory(4, 3, num_items=10)
    f, y, i = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(2)
    cases = [
        (lambda: CrossBatchMemory(0, 3), "size K: expected an integer >= 1, got 0"),
        (lambda: CrossBatchMemory(4, 0), "dim: expected an integer >= 1"),
        (lambda: CrossBatchMemory(4, 3, mode="ring"), "mode: expected one of"),
        (lambda: CrossBatchMemory(4, 3, mode="index"), "'index': expected num_items"),
        (lambda: CrossBatchMemory(4, 3, num_items=0), "num_items: expected an integer >= 1"),
        (lambda: CrossBatchMemory(4, 3, dtype=torch.float64), "dtype: expected one of"),
        (lambda: CrossBatchMemory.from_ratio(0.0, 10, 3), r"ratio: expected a value in \(0, 1\], got 0.0"),
        (lambda: CrossBatchMemory.from_ratio(1.5, 10, 3), r"ratio: expected a value in \(0, 1\], got 1.5"),
        (lambda: mem.enqueue(torch.zeros(2, 4), y, i, 0), r"feats: expected shape B x 3, got \(2, 4\)"),
        (lambda: mem.enqueue(torch.zeros(3), y, i, 0), r"feats: expected shape B x 3, got \(3,\)"),
        (lambda: mem.enqueue(f.long(), y, i, 0), "feats: expected a floating-point tensor, got torch.int64"),
        (lambda: mem.enqueue(f, y.float(), i, 0), "labels: expected an integer tensor, got torch.float32"),
        (lambda: mem.enqueue(f, y, i.float(), 0), "indices: expected an integer tensor"),
        (lambda: mem.enqueue(f, y[:1], i, 0), r"labels: expected shape \(2,\) to match feats, got \(1,\)"),
        (lambda: mem.enqueue(f, y, i, 0.5), "step: expected an int, got float"),
        (lambda: mem.enqueue(f.to("meta"), y, i, 0), "feats: expected a tensor on cpu, got meta"),
        (lambda: mem.enqueue(f, y, torch.tensor([0, 10]), 0), r"indices: expected values in \[0, 10\).*\[0, 10\]"),
        (lambda: mem.enqueue(f, y, torch.tensor([-1, 3]), 0), r"indices: expected values in \[0, 10\).*\[-1, 3\]"),
        (lambda: mem.enqueue(f.numpy(), y, i, 0), "feats: expected a torch.Tensor, got ndarray"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    assert len(mem) == 0  # nothing was written by a rejected call
