"""torch Dataset over reader samples, with the ImageNet preprocessing the methods share."""
from __future__ import annotations

from typing import Callable, Sequence

from tqdm import tqdm

import torch
from torchvision import transforms as T

from .base import DatasetError, Sample, load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transform(resize: int | tuple[int, int], crop: int | None = None,
                       interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR) -> Callable:
    """Resize (int: shorter side, tuple: exact HxW) of the PIL image, optional centre crop, ToTensor, ImageNet
    normalisation."""
    steps: list = [T.Resize(resize, interpolation=interpolation, antialias=True)]
    if crop is not None:
        steps.append(T.CenterCrop(crop))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


class ImageDataset(torch.utils.data.Dataset):
    """Returns (image tensor, index) so callers keep the reader's order."""

    def __init__(self, samples: Sequence[Sample], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.transform(load_image(self.samples[i].path)), i


def make_loader(samples: Sequence[Sample], transform: Callable, *, batch_size: int = 8, workers: int = 0,
                shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=shuffle,
                                       num_workers=workers, generator=g, pin_memory=torch.cuda.is_available())


def load_stack(samples: Sequence[Sample], transform: Callable, batch_size: int = 16, desc: str = "load") -> torch.Tensor:
    """All images of `samples` through `transform`, stacked in reader order (for sets that fit in memory)."""
    # A plain loader, as LGST always used: its iterator seed comes from the global RNG, which seeded training
    # runs depend on.
    loader = torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=False)
    batches = [x for x, _ in tqdm(loader, desc=desc, leave=False)]
    if not batches:
        raise DatasetError(f"no images to load for '{desc}'")
    return torch.cat(batches)
