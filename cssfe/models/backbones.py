"""Backbones: image -> feature map [B, D, h, w]. One registry, one way in: ``build_backbone(name)``.

Pretrained weights come from torchvision's weight enums (downloaded or read from the torch hub
cache) or from a local file given as ``weights_path``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torchvision

from cssfe.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")


class SmallCNN(nn.Module):
    """A CPU-friendly conv net for the bundled 64x64 digits: stride 8, 128 channels."""

    def __init__(self, width: int = 32, norm: str = "batch"):
        super().__init__()

        def normalization(channels: int) -> nn.Module:
            # group norm: each image normalised on its own, so the result does not depend on how a
            # batch is split over processes (batch norm's statistics are per rank without SyncBN)
            return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(8, channels)

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), normalization(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(3, width, 2),
            block(width, 2 * width, 1),
            block(2 * width, 4 * width, 2),
            block(4 * width, 4 * width, 1),
            block(4 * width, 4 * width, 2),
        )
        self.out_channels = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResNetFeatures(nn.Module):
    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        self.body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
        self.out_channels = net.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class VGGFeatures(nn.Module):
    def __init__(self, net: torchvision.models.VGG):
        super().__init__()
        self.body = net.features
        self.out_channels = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ViTFeatures(nn.Module):
    """Patch tokens of the last encoder layer (class token dropped), as a [B, 768, h, w] map."""

    def __init__(self, net: torchvision.models.VisionTransformer):
        super().__init__()
        self.net = net
        self.out_channels = net.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        tokens = self.net._process_input(x)
        cls = self.net.class_token.expand(n, -1, -1)
        tokens = self.net.encoder(torch.cat([cls, tokens], dim=1))[:, 1:]
        side = x.shape[-1] // self.net.patch_size
        return tokens.transpose(1, 2).reshape(n, -1, x.shape[-2] // self.net.patch_size, side)


def _weights_error(name: str, weights, exc: Exception) -> RuntimeError:
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    return RuntimeError(
        f"pretrained weights for backbone {name!r} ({weights}) could not be had: {type(exc).__name__}: {exc}. "
        f"Download {weights.url} elsewhere and either put it in {cache} or set "
        f"model.weights_path=/path/to/{os.path.basename(weights.url)}; or set model.pretrained=false."
    )


def _load_weights(model: nn.Module, name: str, weights, pretrained: bool, weights_path: Optional[str], image_size: int) -> None:
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"model.weights_path: file not found: {weights_path}")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    elif pretrained:
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as exc:  # offline, proxy, truncated download ...
            raise _weights_error(name, weights, exc) from None
    else:
        return
    if isinstance(model, torchvision.models.VisionTransformer) and "encoder.pos_embedding" in state:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(image_size, model.patch_size, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"weights for backbone {name!r} lack {len(missing)} tensors, e.g. {missing[:3]}")


def _small(norm: str, name: str, pretrained: bool, weights_path: Optional[str]) -> nn.Module:
    if pretrained:
        raise ValueError(f"backbone {name!r} has no pretrained weights; set model.pretrained=false")
    net = SmallCNN(norm=norm)
    if weights_path is not None:
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return net


@BACKBONES.register("smallcnn")
def _smallcnn(pretrained: bool = False, weights_path: Optional[str] = None, image_size: int = 64) -> nn.Module:
    return _small("batch", "smallcnn", pretrained, weights_path)


@BACKBONES.register("smallcnn_gn")
def _smallcnn_gn(pretrained: bool = False, weights_path: Optional[str] = None, image_size: int = 64) -> nn.Module:
    """smallcnn with group norm: batch-size independent (exact comparisons across world sizes)."""
    return _small("group", "smallcnn_gn", pretrained, weights_path)


@BACKBONES.register("resnet50")
def _resnet50(pretrained: bool = False, weights_path: Optional[str] = None, image_size: int = 448) -> nn.Module:
    net = torchvision.models.resnet50(weights=None)
    _load_weights(net, "resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V2, pretrained, weights_path, image_size)
    return ResNetFeatures(net)


@BACKBONES.register("vgg16")
def _vgg16(pretrained: bool = False, weights_path: Optional[str] = None, image_size: int = 448) -> nn.Module:
    net = torchvision.models.vgg16(weights=None)
    _load_weights(net, "vgg16", torchvision.models.VGG16_Weights.IMAGENET1K_V1, pretrained, weights_path, image_size)
    return VGGFeatures(net)


@BACKBONES.register("vit_b_16")
def _vit_b_16(pretrained: bool = False, weights_path: Optional[str] = None, image_size: int = 448) -> nn.Module:
    if image_size % 16:
        raise ValueError(f"backbone 'vit_b_16' needs data.image_size divisible by 16, got {image_size}")
    net = torchvision.models.vit_b_16(weights=None, image_size=image_size)
    _load_weights(net, "vit_b_16", torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1, pretrained, weights_path, image_size)
    return ViTFeatures(net)


def build_backbone(name: str, pretrained: bool = False, weights_path: Optional[str] = None, image_size: int = 448) -> nn.Module:
    return BACKBONES.build(name, pretrained=pretrained, weights_path=weights_path, image_size=image_size)
