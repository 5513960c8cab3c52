"""Image transforms, chosen by name (``data.augment``).

- ``none``: resize and normalise.
- ``digits`` (the bundled data): random shifts and a random permutation of the colour channels.
  Colour carries no label there and positions are free, so both preserve the labels; no flips or
  rotations by 90 degrees (a mirrored 2 or a turned 6 is another digit).
- ``natural``: horizontal flip + RandAugment, the reference recipe for natural images.
"""
from __future__ import annotations

import torch
from torchvision import transforms as T

from cssfe.registry import Registry

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

AUGMENTATIONS: Registry[list] = Registry("augmentation")


class RandomChannelPermutation(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image[torch.randperm(image.shape[0])]


@AUGMENTATIONS.register("none")
def _none(image_size: int) -> list:
    return []


@AUGMENTATIONS.register("digits")
def _digits(image_size: int) -> list:
    return [T.RandomCrop(image_size, padding=image_size // 8)]


@AUGMENTATIONS.register("natural")
def _natural(image_size: int) -> list:
    return [T.RandomHorizontalFlip(), T.RandAugment()]


def build_transform(image_size: int, train: bool, augment: str = "none") -> T.Compose:
    steps = [T.Resize((image_size, image_size))]
    if train:
        steps += AUGMENTATIONS.build(augment, image_size)
    steps += [T.ToTensor()]
    if train and augment == "digits":
        steps += [RandomChannelPermutation()]
    steps += [T.Normalize(MEAN, STD)]
    return T.Compose(steps)
