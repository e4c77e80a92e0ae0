import pytest
import torch
import torchvision
from torch import nn

from xbmcore.config import ModelParams
from xbmcore.models import build_model

torch.set_num_threads(1)


def smallcnn(**kw):
    torch.manual_seed(0)
    return build_model(ModelParams(backbone="smallcnn", **kw))


def test_output_shape_and_unit_norm():
    model = smallcnn(embedding_dim=24)
    assert model.embedding_dim == 24
    out = model(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_gradient_reaches_every_parameter():
    model = smallcnn(embedding_dim=8)
    out = model(torch.randn(4, 3, 32, 32))
    (out[:2] @ out[2:].T).sum().backward()  # a loss on similarities, like the pair losses
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_channels_last_input_matches_contiguous():
    model = smallcnn(embedding_dim=16).eval()
    x = torch.randn(3, 3, 32, 32)
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)


def test_freeze_bn_keeps_running_stats_in_train_mode():
    with pytest.warns(UserWarning, match="freeze_bn with pretrained: none"):
        model = smallcnn(embedding_dim=8, freeze_bn=True)
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns) and model.head.training
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(torch.randn(4, 3, 32, 32) * 3 + 1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m, (mean, var, n) in zip(bns, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, n)
    # Without freezing, one forward pass in train mode moves the statistics.
    free = smallcnn(embedding_dim=8).train()
    free(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert free.backbone[0][1].running_mean.abs().sum() > 0


def test_eval_then_train_refreezes():
    with pytest.warns(UserWarning):
        model = smallcnn(freeze_bn=True)
    model.eval().train()
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_resnet18_builds_without_pretrained_weights():
    torch.manual_seed(0)
    model = build_model(ModelParams(backbone="resnet18", embedding_dim=32))
    assert model.feat_dim == 512 and model.head.in_features == 512
    assert not hasattr(model.backbone, "fc") and not hasattr(model.backbone, "avgpool")
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_pretrained_download_failure_explains_how_to_go_on(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", "/some/torch_home")
    with pytest.raises(RuntimeError) as info:
        build_model(ModelParams(backbone="resnet18", pretrained="imagenet"))
    msg = str(info.value)
    assert "could not be downloaded" in msg and "Temporary failure" in msg
    assert "/some/torch_home/hub/checkpoints" in msg and "resnet18-f37072fd.pth" in msg
    assert "model.pretrained: none" in msg
    assert isinstance(info.value.__cause__, OSError)


def test_pretrained_weights_are_loaded(monkeypatch):
    reference = torchvision.models.resnet18()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", lambda self, *a, **k: state)
    model = build_model(ModelParams(backbone="resnet18", pretrained="imagenet"))
    torch.testing.assert_close(model.backbone.conv1.weight, state["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"],
                               rtol=0, atol=0)


def test_smallcnn_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="smallcnn has no ImageNet weights"):
        build_model(ModelParams(backbone="smallcnn", pretrained="imagenet"))


def _random_state(module):
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("wrap", [None, "model", "state_dict", "module."])
def test_a_local_file_of_the_whole_model_is_loaded(tmp_path, wrap):
    source = smallcnn(embedding_dim=16)
    state = _random_state(source)
    if wrap == "module.":  # saved from a DistributedDataParallel
        saved = {f"module.{k}": v for k, v in state.items()}
    else:
        saved = state if wrap is None else {wrap: state, "step": torch.tensor(3)}
    torch.save(saved, tmp_path / "w.pt")
    model = smallcnn(embedding_dim=16, pretrained=str(tmp_path / "w.pt"))
    assert _same(model.state_dict(), state)
    # A caller that loads trained weights next does not need the file.
    (tmp_path / "w.pt").unlink()
    assert not _same(build_model(ModelParams(embedding_dim=16, pretrained=str(tmp_path / "w.pt")),
                                 load_weights=False).state_dict(), state)


def test_a_torchvision_checkpoint_loads_into_the_backbone_without_its_classifier(tmp_path):
    state = _random_state(torchvision.models.resnet18())  # conv1.* ... layer4.*, fc.* as torchvision saves it
    torch.save(state, tmp_path / "resnet18.pth")
    torch.manual_seed(0)
    model = build_model(ModelParams(backbone="resnet18", embedding_dim=8, pretrained=str(tmp_path / "resnet18.pth")))
    torch.testing.assert_close(model.backbone.conv1.weight, state["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"],
                               rtol=0, atol=0)


def test_a_file_that_does_not_fit_is_named_with_its_keys_and_shapes(tmp_path):
    state = _random_state(smallcnn(embedding_dim=16))
    bad = {k: v for k, v in state.items() if k != "head.bias"}
    bad["head.extra"] = torch.zeros(2)
    bad["backbone.0.0.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as info:
        smallcnn(embedding_dim=16, pretrained=str(tmp_path / "bad.pt"))
    msg = str(info.value)
    assert f"model.pretrained: {tmp_path / 'bad.pt'} does not fit the model (EmbeddingNet)" in msg
    assert "missing head.bias" in msg and "unexpected head.extra" in msg
    assert "backbone.0.0.weight has shape (5, 3, 3, 3), expected (32, 3, 3, 3)" in msg
    # A backbone-only file of another architecture: the backbone's own key names come back.
    torch.save(_random_state(torchvision.models.resnet18()), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"does not fit the backbone \(SmallCNN\): missing 0\.0\.weight, .* and 16 more; "
                                         r"unexpected bn1\.bias, .* and \d+ more$"):
        smallcnn(embedding_dim=16, pretrained=str(tmp_path / "resnet18.pth"))


def test_a_missing_or_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"model.pretrained: .*nothere.pt is not a file \(expected none, imagenet"):
        smallcnn(pretrained=str(tmp_path / "nothere.pt"))
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(ValueError, match=r"text.pt could not be read as torch weights"):
        smallcnn(pretrained=str(tmp_path / "text.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt holds no state dict"):
        smallcnn(pretrained=str(tmp_path / "list.pt"))
    torch.save({"pretrain_skipped": "the sop dataset has no pretrain split"}, tmp_path / "skipped.pt")
    with pytest.raises(ValueError, match=r"skipped.pt holds no weights: the sop dataset has no pretrain split"):
        smallcnn(pretrained=str(tmp_path / "skipped.pt"))
    with pytest.raises(ValueError, match="pretrained: expected none, imagenet or the path"):
        ModelParams(pretrained=" ")


def test_group_norm_smallcnn_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    net = build_model(ModelParams(norm="group"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in net.modules()) == 4
    x = torch.randn(6, 3, 32, 32)
    net.train()
    alone = net(x[:1])
    with_others = net(x)[:1]  # BatchNorm in train mode would give another embedding here
    torch.testing.assert_close(alone, with_others, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="model.norm: 'group' is for smallcnn"):
        build_model(ModelParams(backbone="resnet18", norm="group"))
