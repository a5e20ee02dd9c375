"""The inference paths export: the feature extractor, PatchCore (extractor + patch embedding + torch nearest-
neighbour scoring against the bank) and GLASS (extractor + patch embedding + adaptor + discriminator) traced with
TorchScript, saved and loaded again, give the eager scores (allclose 1e-5) on images other than the trace example.
torch.export (the extractor, GLASS) and ONNX (the extractor; only with the onnx package) the same way."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from methods.patchcore import embed, score_embeddings
from models.backbones import load_backbone
from models.feature_extractor import FeatureExtractor

TOL = dict(rtol=1e-5, atol=1e-5)


def _backbone(name: str, weights="random") -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(name, weights)


def _traced(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """torch.jit.trace, then a save/load round trip (what a deployment ships)."""
    with warnings.catch_warnings():
        # deprecation notice, and the TracerWarnings of the finiteness checks (bool(...) of a tensor): those
        # checks guard the eager path; on the traced graph they are constant branches
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _pil(seed: int, size=(40, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


class Maps(nn.Module):
    """The extractor's maps as a tuple (the requested order)."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, x):
        out = self.extractor(x)
        return tuple(out[k] for k in self.extractor.layers)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_extractor_traces(name):
    fe = FeatureExtractor(_backbone(name), ["layer3", "layer1"])
    traced = _traced(Maps(fe), _images(2, 48, 40, 0))
    x = _images(2, 48, 40, 1)
    want = fe(x)
    got = traced(x)
    assert len(got) == 2
    for g, k in zip(got, ["layer3", "layer1"]):
        torch.testing.assert_close(g, want[k], **TOL)
    # the trace is the truncated pass: the head (and, for layer3, the last stage) is not in the graph
    convs = len(traced.inlined_graph.findAllNodes("aten::_convolution"))
    n_convs = sum(isinstance(m, nn.Conv2d) for m in fe.backbone.modules())
    after = fe.backbone.get_submodule(fe.backbone.layer_aliases["layer4"])
    assert 0 < convs <= n_convs - sum(isinstance(m, nn.Conv2d) for m in after.modules())


def test_extractor_torch_export():
    fe = FeatureExtractor(_backbone("resnet18"), ["layer2", "layer3"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.export.export(Maps(fe).eval(), (_images(1, 32, 32, 0),))
    x = _images(1, 32, 32, 2)
    for g, w in zip(prog.module()(x), Maps(fe)(x)):
        torch.testing.assert_close(g, w, **TOL)


def test_extractor_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    fe = FeatureExtractor(_backbone("resnet18"), ["layer2", "layer3"])
    path = tmp_path / "extractor.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Maps(fe).eval(), (_images(1, 32, 32, 0),), str(path), input_names=["image"],
                          output_names=["layer2", "layer3"])
    onnx.checker.check_model(onnx.load(str(path)))
    ort = pytest.importorskip("onnxruntime")
    x = _images(1, 32, 32, 3)
    got = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})
    for g, w in zip(got, Maps(fe)(x)):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ PatchCore
class PatchCoreScorer(nn.Module):
    """Normalised images -> (patch scores (B, h, w), image scores (B,)): methods.patchcore.embed and
    score_embeddings with the torch distance backend, the bank a buffer of the module."""

    def __init__(self, extractor: FeatureExtractor, bank: torch.Tensor, cfg):
        super().__init__()
        self.extractor, self.cfg = extractor, cfg
        self.register_buffer("bank", bank)

    def forward(self, images):
        return score_embeddings(embed(self.extractor, images, self.cfg), self.bank, self.cfg, "torch")


@pytest.mark.parametrize("method,overrides", [
    # with patchcore-inspection's BatchNorm update: the updated statistics are part of the export
    ("patchcore", dict(resize=(40,), crop=32, pretrain_dim=48, target_dim=32, num_nn=3, official_bn_update=True)),
    ("sapatchcore", dict(resize=(32, 32), crop=0, reweight=True, reweight_b=4)),
])
def test_patchcore_scores_trace(method, overrides):
    from methods.patchcore import PatchCoreConfig, PatchCoreModel

    cfg = PatchCoreConfig.preset(method, coreset_ratio=0.5, knn_backend="torch", **overrides)
    model = PatchCoreModel(_backbone("resnet18"), cfg, device="cpu").fit([_pil(i) for i in range(3)],
                                                                         progress=False)
    scorer = PatchCoreScorer(model.extractor, model.bank, cfg)
    traced = _traced(scorer, model.preprocess([_pil(10), _pil(11)]))
    test = [_pil(20), _pil(21)]
    x = model.preprocess(test)
    got_patch, got_image = traced(x)
    want_patch, want_image = model.score_embeddings(model.embed(x))
    assert got_patch.shape == want_patch.shape == (2, 4, 4)
    torch.testing.assert_close(got_patch, want_patch, **TOL)
    torch.testing.assert_close(got_image, want_image, **TOL)
    want = model.predict(test, maps=False, progress=False).scores  # the public eager path, from the PIL images
    np.testing.assert_allclose(got_image.numpy(), want, **TOL)
    assert abs(want[0] - want[1]) > 0  # two different images, two different scores


# ------------------------------------------------------------------------------------------------ GLASS
class GlassScorer(nn.Module):
    """Preprocessed images -> (patch probabilities (B, h, w), image scores (B,) = max patch probability), i.e.
    methods.glass.Glass.patch_scores (embed -> adaptor -> discriminator) and GlassModel.predict's image score."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images):
        s = self.net.patch_scores(images)
        return s, s.flatten(1).amax(1)


def test_glass_scores_trace():
    from methods.glass import GlassConfig, GlassModel

    cfg = GlassConfig.fast(imagesize=32, resize=32, pretrain_dim=48, target_dim=48, dsc_hidden=32)
    torch.manual_seed(0)
    model = GlassModel(_backbone("resnet18"), cfg, device="cpu", resize=32)
    traced = _traced(GlassScorer(model.net), model.preprocess([_pil(0), _pil(1)]))
    test = [_pil(2), _pil(3)]
    with torch.no_grad():  # a trace does not record the eager path's no_grad: the caller sets it
        got_patch, got_image = traced(model.preprocess(test))
    want = model.predict(test, maps=False).scores  # the public eager path, from the PIL images
    torch.testing.assert_close(got_patch, model.forward_networks(model.preprocess(test)), **TOL)
    np.testing.assert_allclose(got_image.numpy(), want, **TOL)
    assert got_patch.shape == (2, 4, 4) and abs(want[0] - want[1]) > 0
    with warnings.catch_warnings():  # the same module through torch.export
        warnings.simplefilter("ignore")
        prog = torch.export.export(GlassScorer(model.net).eval(), (model.preprocess([_pil(0), _pil(1)]),))
    np.testing.assert_allclose(prog.module()(model.preprocess(test))[1].detach().numpy(), want, **TOL)
