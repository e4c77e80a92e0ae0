import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from xbmcore.sampler import PKSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.fixture
def labels():
    # 11 classes with 1..11 images, shuffled; label values non-contiguous (x 3 + 7) on purpose.
    rng = np.random.default_rng(0)
    lab = np.repeat(np.arange(11), np.arange(1, 12)) * 3 + 7
    return rng.permutation(lab)


def test_batches_are_P_classes_times_M_images(labels):
    s = PKSampler(labels, batch_size=12, images_per_class=4, seed=1)  # P = 3
    assert (s.P, s.M, s.len_epoch) == (3, 4, 4)  # ceil(11 / 3)
    for batch in take(s, 3 * s.len_epoch):
        assert len(batch) == 12
        per_class = Counter(labels[batch].tolist())
        assert len(per_class) == 3 and set(per_class.values()) == {4}
        rows = labels[batch].reshape(3, 4)  # the M images of a class are consecutive
        assert (rows == rows[:, :1]).all()
        for c in per_class:
            idx = [i for i in batch if labels[i] == c]
            if (labels == c).sum() >= 4:
                assert len(set(idx)) == 4  # without replacement
            else:
                assert set(idx) <= set(np.flatnonzero(labels == c))  # with replacement, from its own images


def test_epoch_covers_every_class_and_fills_last_chunk(labels):
    s = PKSampler(labels, batch_size=8, images_per_class=2, seed=3)  # P = 4, 11 classes -> 3 batches
    for epoch in range(3):
        batches = take(s, s.len_epoch)
        classes = [list(dict.fromkeys(labels[b].tolist())) for b in batches]
        seen = [c for cs in classes for c in cs]
        assert set(seen) == set(labels.tolist())
        assert len(seen) == 12 and len(set(seen[:11])) == 11  # one pass, then one filler class
        assert len(set(classes[-1])) == 4  # filler differs from the classes left in the last chunk
        assert s.state_dict() == {"epoch": epoch + 1, "batch": 0, "seed": 3}


def test_small_classes_drawn_with_replacement():
    labels = np.array([0, 1, 1, 2, 2, 2])
    s = PKSampler(labels, batch_size=9, images_per_class=3, seed=0)  # P = 3 = all classes
    for batch in take(s, 20):
        assert sorted(labels[batch].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert [i for i in batch if labels[i] == 0] == [0, 0, 0]
        assert sorted(i for i in batch if labels[i] == 2) == [3, 4, 5]


def test_same_seed_same_stream_other_seed_differs(labels):
    a = take(PKSampler(labels, 12, 4, seed=5), 20)
    assert a == take(PKSampler(labels, 12, 4, seed=5), 20)
    assert a != take(PKSampler(labels, 12, 4, seed=6), 20)


@pytest.mark.parametrize("stop", [1, 2, 4, 5, 7])  # mid-epoch and at epoch boundaries (len_epoch = 4)
def test_resume_mid_epoch_is_identical(labels, stop):
    full = take(PKSampler(labels, 12, 4, seed=9), 12)
    first = PKSampler(labels, 12, 4, seed=9)
    head = take(first, stop)
    state = first.state_dict()
    assert state == first.state_after(stop)
    resumed = PKSampler(labels, 12, 4, seed=0)
    resumed.load_state_dict(dict(state))
    assert head + take(resumed, 12 - stop) == full


def test_iterating_again_continues_the_stream(labels):
    s = PKSampler(labels, 12, 4, seed=2)
    assert take(s, 3) + take(s, 3) == take(PKSampler(labels, 12, 4, seed=2), 6)


def test_works_as_dataloader_batch_sampler(labels):
    ds = torch.utils.data.TensorDataset(torch.as_tensor(labels))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=PKSampler(labels, 8, 2, seed=0))
    (y,) = next(iter(loader))
    assert y.shape == (8,) and len(set(y.tolist())) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=[0.0, 1.0, 1.0], batch_size=2, images_per_class=1), "labels: expected integers"),
        (dict(labels=[0, 1, 1], batch_size=3, images_per_class=2), r"batch_size \(3\) must be a multiple"),
        (dict(labels=[0, 1, 1], batch_size=6, images_per_class=2), r"3 classes per batch.*only 2 classes"),
        (dict(labels=[], batch_size=2, images_per_class=1), "non-empty"),
        (dict(labels=[0, 1], batch_size=2, images_per_class=0), "images_per_class"),
        (dict(labels=[0, 1], batch_size=2, images_per_class=1, seed=-1), "seed"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PKSampler(**kwargs)


def test_bad_state_raises(labels):
    s = PKSampler(labels, 12, 4)
    with pytest.raises(ValueError, match="missing keys"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="batch < len_epoch"):
        s.load_state_dict({"epoch": 0, "batch": 4, "seed": 0})


def test_ranks_deal_one_global_batch_in_rank_order():
    labels = np.repeat(np.arange(13), 5)
    whole = PKSampler(labels, 16, 2, seed=3)
    parts = [PKSampler(labels, 16, 2, seed=3, rank=r, world=2) for r in (0, 1)]
    for _, batch, a, b in zip(range(20), whole, *parts):  # past an epoch (7 batches): same global stream
        assert len(a) == len(b) == 8 and a + b == batch
        assert len({labels[i] for i in a} & {labels[i] for i in b}) == 0  # whole classes per rank
    with pytest.raises(ValueError, match="rank 2 of world 2"):
        PKSampler(labels, 16, 2, rank=2, world=2)
