"""Image transforms. The bundled digits get no flips (a mirrored digit is another shape)."""
from __future__ import annotations

from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def build_transform(image_size: int, train: bool, augment: bool) -> T.Compose:
    steps = [T.Resize((image_size, image_size))]
    if train and augment:
        # The reference recipe (CPRFL / ASL lineage) for natural images.
        steps += [T.RandomHorizontalFlip(), T.RandAugment()]
    steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(steps)
