"""FeatureExtractor (truncated forward) against the earlier mechanism: forward hooks that record the maps and raise
an exception after the last requested layer. Same maps bit for bit on every backbone of models.backbones, the same
BatchNorm buffers touched by official_bn_update, several extractors on one backbone, no hooks left behind."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from models.backbones import BACKBONES, load_backbone
from models.feature_extractor import FeatureExtractor


class _Stop(Exception):
    pass


class HookReference:
    """The earlier FeatureExtractor mechanism, kept as the reference: hooks on the requested modules, an exception
    from the last one (in module order) stops the backbone's own forward. Hooks are removed on close()."""

    def __init__(self, backbone: nn.Module, layers):
        self.backbone, self.layers = backbone, list(layers)
        aliases = getattr(backbone, "layer_aliases", {})
        modules = {n: backbone.get_submodule(aliases.get(n, n)) for n in self.layers}
        order = {id(m): i for i, m in enumerate(backbone.modules())}
        self.last = max(self.layers, key=lambda n: order[id(modules[n])])
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(_m, _i, out):
            self.out[name] = out
            if name == self.last:
                raise _Stop
        return hook

    def __call__(self, x):
        self.out = {}
        with torch.no_grad():
            try:
                self.backbone(x)
            except _Stop:
                pass
        return {n: self.out[n] for n in self.layers}

    def official_bn_update(self, size):
        self.backbone.train()
        try:
            self(torch.ones(1, 3, *size))
        finally:
            self.backbone.eval()

    def close(self):
        for h in self.handles:
            h.remove()


def _reference(backbone, layers, fn):
    ref = HookReference(backbone, layers)
    try:
        return fn(ref)
    finally:
        ref.close()


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_backbone(name, "random")
    except ImportError as exc:  # e.g. timm not installed
        pytest.skip(f"{name} does not build here: {exc}")
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # loaded-looking statistics, so that outputs and BN updates are not trivial
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _layer_sets(model: nn.Module) -> list[list[str]]:
    uniform = [["layer1", "layer2", "layer3", "layer4"], ["layer3", "layer2"], ["layer1"], ["layer4", "layer1"]]
    if "blocks.1" in model.layer_aliases.values():  # EfficientNet: raw block paths, one from inside a stage
        raw = [["blocks.3.1", "layer3"], ["layer1", "blocks.2.0", "blocks.1"]]
    else:  # ResNet: a block from inside a stage that is not the last one, the last block of a stage
        raw = [["layer2.0", "layer3"], ["layer2.1", "layer1"]]
    return uniform + raw


@pytest.mark.parametrize("name", list(BACKBONES))
def test_same_maps_and_bn_updates_as_hooks(name):
    model = _build(name)
    x = torch.randn(1, 3, 36, 32, generator=torch.Generator().manual_seed(2))
    for layers in _layer_sets(model):
        ours = FeatureExtractor(model, layers)(x)
        ref = _reference(model, layers, lambda r: r(x))
        assert list(ours) == list(ref) == layers
        for k in layers:
            assert ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k]), (name, layers, k)
            assert not ours[k].requires_grad
    assert _no_hooks(model)

    # official_bn_update: the same buffers, to the bit, and only those of the modules the forward reaches
    layers = ["layer2", "layer3"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _reference(model, layers, lambda r: r.official_bn_update((36, 32)))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    fe = FeatureExtractor(model, layers)
    fe.official_bn_update((36, 32))
    got = model.state_dict()
    assert not model.training
    for k in got:
        assert torch.equal(got[k], want[k]), (name, k)
    moved = {k for k in got if not torch.equal(got[k], before[k])}
    stage3 = model.layer_aliases["layer3"]
    assert any(k.startswith(stage3 + ".") and k.endswith("running_mean") for k in moved)
    after3 = model.layer_aliases["layer4"] + "."  # the next stage and the head are never reached
    head = ("fc.", "bn2.", "conv_head.")
    assert not any(k.startswith(after3) or k.startswith(head) for k in moved), sorted(moved)[-3:]


def test_timm_resnet_without_aliases():
    """timm's ResNet (stem conv1/bn1/act1/maxpool) by its own module names, no layer_aliases attribute."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for layers in (["layer1", "layer2", "layer3", "layer4"], ["layer3", "layer2.0"]):
        ours = FeatureExtractor(model, layers)(x)
        ref = _reference(model, layers, lambda r: r(x))
        assert list(ours) == layers and all(torch.equal(ours[k], ref[k]) for k in layers)


def test_shared_backbone_and_api():
    model = _build("resnet18")
    x = torch.randn(3, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    alone = {layers: _reference(model, list(layers), lambda r: r(x)) for layers in (("layer1", "layer3"), ("layer2",))}
    a, b = FeatureExtractor(model, ["layer1", "layer3"]), FeatureExtractor(model, ["layer2"])
    assert a.backbone is model and b.backbone is model and a.layers == ["layer1", "layer3"]
    for _ in range(2):  # interleaved calls: each extractor returns its own layers, unaffected by the other
        fb, fa = b(x), a(x)
        assert list(fa) == ["layer1", "layer3"] and list(fb) == ["layer2"]
        assert all(torch.equal(fa[k], alone[("layer1", "layer3")][k]) for k in fa)
        assert torch.equal(fb["layer2"], alone[("layer2",)]["layer2"])
    assert _no_hooks(model)  # nothing registered on the shared backbone
    # the backbone's modules are registered once, under .backbone
    assert list(a.state_dict()) == [f"backbone.{k}" for k in model.state_dict()]
    assert a.feature_dims == {"layer1": 64, "layer3": 256} and b.feature_dims == {"layer2": 128}
    a.train()
    assert a.training and not model.training and not any(m.training for m in model.modules())
    # a user's hook still fires, and the modules after the last requested layer do not run
    fired = []
    handles = [model.get_submodule(n).register_forward_hook(lambda *_, n=n: fired.append(n))
               for n in ("layer2", "layer3", "layer4", "fc")]
    b(x)
    for h in handles:
        h.remove()
    assert fired == ["layer2"]
    # a stage together with its own last block (the hooks stopped inside the stage before it returned: KeyError)
    both = FeatureExtractor(model, ["layer2", "layer2.1"])(x)
    assert torch.equal(both["layer2"], alone[("layer2",)]["layer2"]) and torch.equal(both["layer2.1"], both["layer2"])


def test_deepcopy_and_dtype_follow_the_backbone():
    """The truncated forward holds the backbone's own modules: a deep copy runs (and updates) its copied backbone,
    and .to(float64) on the extractor converts what it runs."""
    model = _build("efficientnet_lite0")
    fe = FeatureExtractor(model, ["layer2", "layer3"])
    twin = copy.deepcopy(fe)
    assert twin.backbone is not model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin.official_bn_update((32, 32))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched
    moved = [k for k, v in twin.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert "bn1.running_mean" in moved
    fe.to(torch.float64)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    ours = fe(x)
    ref = _reference(model, ["layer2", "layer3"], lambda r: r(x))
    assert ours["layer3"].dtype == torch.float64 and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_layers_that_cannot_be_cut_out():
    model = _build("resnet18")
    with pytest.raises(ValueError, match="layer2.0.conv1"):  # inside a residual block: not a chain of children
        FeatureExtractor(model, ["layer2.0.conv1", "layer3"])
    with pytest.raises(ValueError, match="'fc'"):  # the classifier is not on the feature chain
        FeatureExtractor(model, ["fc"])
    with pytest.raises(ValueError, match="Wrapper"):  # a forward the extractor does not know

        class Wrapper(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = model

        FeatureExtractor(Wrapper(), ["net.layer2"])
    with pytest.raises(AttributeError):
        FeatureExtractor(model, ["layer9"])
    with pytest.raises(ValueError, match="at least one"):
        FeatureExtractor(model, [])
