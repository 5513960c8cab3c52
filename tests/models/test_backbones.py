"""Backbones: feature map shapes, local weight files, clear errors for missing weights."""
import pytest
import torch

from cssfe.models.backbones import BACKBONES, build_backbone

SHAPES = {"smallcnn": (64, 128, 8), "smallcnn_gn": (64, 128, 8), "resnet50": (64, 2048, 2), "vgg16": (64, 512, 2), "vit_b_16": (32, 768, 2)}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_feature_map_shape(name):
    size, channels, side = SHAPES[name]
    net = build_backbone(name, image_size=size).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, channels, side, side)
    assert net.out_channels == channels


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision

    ref = torchvision.models.vit_b_16(weights=None, image_size=32)
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    net = build_backbone("vit_b_16", weights_path=str(path), image_size=32)
    assert torch.equal(net.net.conv_proj.weight, ref.conv_proj.weight)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path.*nope.pth"):
        build_backbone("resnet50", weights_path=str(tmp_path / "nope.pth"))


def test_unreachable_pretrained_weights_say_how_to_supply_them(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    import torchvision.models._api as weights_api

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="network is unreachable.*model.weights_path"):
        build_backbone("resnet50", pretrained=True)


def test_unknown_backbone_lists_choices():
    with pytest.raises(KeyError, match="resnet50"):
        build_backbone("resnet5")
