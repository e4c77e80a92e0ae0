"""The pretrain stage and `model.pretrained: <its output>`: the warm-up starts from exactly those weights; a dataset
without a pretrain split is skipped with its reason; the warm-up's checkpoints follow the file's bytes."""
from __future__ import annotations

import pytest
import torch

from pipeline import stages
from tiny_project import tiny_params
from xbmcore.checkpoint import load_checkpoint
from xbmcore.config import validate_params
from xbmcore.checkpoint import training_digest

torch.set_num_threads(1)
OUT = "artifacts/pretrain/model.pt"


def test_the_warmup_starts_from_the_pretrain_stage_output(tmp_path):
    p = validate_params(tiny_params(model={"pretrained": OUT}, train={"warmup_steps": 0}))
    stages.run_download(p, tmp_path)
    path = stages.run_pretrain(p, tmp_path)
    assert path == tmp_path / OUT
    weights = torch.load(path, weights_only=True)  # a plain state dict: any user can load it
    fresh = stages.build_model(p.model, load_weights=False).state_dict()
    assert weights.keys() == fresh.keys()
    assert not torch.equal(weights["head.weight"], fresh["head.weight"])
    # A warm-up of 0 steps leaves the model as it started: the pretrain stage's weights, found from the root.
    state = load_checkpoint(stages.run_warmup(p, tmp_path))
    assert all(torch.equal(state["model"][k], v) for k, v in weights.items())
    # The warm-up's checkpoints are keyed on the file's bytes, not its name.
    resolved = stages.resolve_pretrained(p, tmp_path)
    before = training_digest(resolved, "warmup")
    weights["head.bias"] += 1
    torch.save(weights, path)
    assert training_digest(resolved, "warmup") != before


def test_no_pretrain_split_skips_the_stage_and_says_why(tmp_path):
    p = validate_params(tiny_params(data={"synthetic": {"pretrain_classes": 0}}, model={"pretrained": OUT}))
    stages.run_download(p, tmp_path)
    stages.run_pretrain(p, tmp_path)
    with pytest.raises(ValueError, match=r"holds no weights: the synthetic dataset has no pretrain split"):
        stages.run_warmup(p, tmp_path)


def test_a_missing_pretrain_output_says_which_stage_makes_it(tmp_path):
    p = validate_params(tiny_params(model={"pretrained": OUT}))
    stages.run_download(p, tmp_path)
    with pytest.raises(ValueError, match=r"model.pretrained: .*artifacts/pretrain/model.pt is not a file.*"
                                         r"python -m pipeline.pretrain"):
        stages.run_warmup(p, tmp_path)
