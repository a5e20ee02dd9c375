"""The training features that grow with the image count (PatchCore's bank before the coreset, GLASS's feature
cache) are filled in place, so a paper-scale fit holds them once: tested equal to the per-image embeddings."""
from __future__ import annotations

import dataclasses

import pytest
import torch

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def train_images(synthetic_root):
    from dataset_readers import read_category

    return read_category("synthetic_loco", "synth_box", synthetic_root).train[:5]


@pytest.mark.parametrize("method", ["patchcore", "sapatchcore"])
def test_bank_filled_in_place_equals_the_per_image_embeddings(train_images, lite0_weights, method):
    from methods.patchcore import as_images, build_bank, defaults_for, embed, image_loader
    from models.backbones import load_backbone
    from models.feature_extractor import FeatureExtractor

    cfg = defaults_for(method, resize=(64, 64), crop=64, coreset_ratio=1.0)
    ex = FeatureExtractor(load_backbone(LITE0, lite0_weights), cfg.layers)
    with torch.no_grad():
        ref = torch.cat([embed(ex, x, cfg).flatten(0, 2)
                         for x, _ in image_loader(as_images(train_images), cfg, batch_size=1)])
        bank = build_bank(ex, train_images, cfg, torch.device("cpu"), batch_size=2, progress=False)
    assert bank.shape == ref.shape and len(bank) == 5 * 8 * 8  # 64 px -> 8 x 8 patches (layer2 stride 8)
    torch.testing.assert_close(bank, ref, rtol=1e-3, atol=1e-3)  # batch 2 vs 1: summation order only


@pytest.mark.parametrize("max_gb", [4.0, 0.0])
def test_glass_cache_filled_in_place_equals_the_per_image_features(train_images, lite0_weights, max_gb):
    from methods.glass import Glass, GlassConfig, Trainer, fast_config
    from models.backbones import load_backbone

    cfg = dataclasses.replace(fast_config(GlassConfig()), cache_max_gb=max_gb, batch_size=2)
    model = Glass(load_backbone(LITE0, lite0_weights), cfg)
    trainer = Trainer(model, cfg, torch.device("cpu"))
    one = Trainer(model, dataclasses.replace(cfg, batch_size=1, cache_max_gb=4.0), torch.device("cpu"))
    cache = trainer.cache_features(train_images, 64)
    ref = torch.cat([one.cache_features([im], 64) for im in train_images])
    assert cache.dtype == (torch.float16 if max_gb == 0.0 else torch.float32)  # over the limit: float16
    assert cache.shape == ref.shape and cache.shape[0] == 5
    torch.testing.assert_close(cache.float(), ref.to(cache.dtype).float(), rtol=1e-3 if max_gb == 0 else 1e-4,
                               atol=1e-3 if max_gb == 0 else 1e-4)
