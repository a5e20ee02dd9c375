"""CSAD's deployable inference path (the official export, `Tokichan/CSAD export_model.py` /
`models/onnx_model.py`): the backbone runs once per image and its layer1/layer2/layer3 maps feed both the
component segmentor (layer1 + layer3) and the LGST teacher (layer2 + layer3). With a fitted Patch Histogram and
the saved validation scores it also returns the fused score (trimmed z of each branch, summed), the same number
benchmark_performance.py computes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from evaluation.fusion import trimmed_stats
from models.feature_extractor import FeatureExtractor

from .lgst import LGSTModel

FUSED_LAYERS = ("layer1", "layer2", "layer3")


class FusedCSAD(nn.Module):
    """The one-pass module; methods.csad.model.CSADModel is the model object (fit / predict / checkpoint) around it."""

    def __init__(self, backbone: nn.Module, segmentor: nn.Module, lgst: LGSTModel, patch_histogram=None,
                 val_scores: dict[str, Sequence[float]] | None = None, *, resolution: int = 256):
        """val_scores: {"LGST": ..., "patchhist": ...} validation image scores (the *_val_score.npy files).
        resolution: the input size, also the segmentation output size (segmentor and LGST share the input)."""
        super().__init__()
        self.extractor = FeatureExtractor(backbone, FUSED_LAYERS)
        self.segmentor = segmentor.eval()
        self.lgst = lgst.eval()
        self.patch_histogram = patch_histogram
        self.resolution = resolution
        self.stats = {k: trimmed_stats(np.asarray(v)) for k, v in (val_scores or {}).items()}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: ImageNet-normalised (B, 3, R, R). Returns segmentation logits, the LGST map at input size, the LGST
        score, and, when available, the Patch-Histogram and fused scores."""
        feats = self.extractor(x)  # the one backbone pass
        logits = self.segmentor({k: feats[k] for k in ("layer1", "layer3")}, self.resolution)
        lgst_map, lgst_score = self.lgst.anomaly_maps(x, feats={k: feats[k] for k in ("layer2", "layer3")})
        out = {"logits": logits, "lgst_map": lgst_map, "lgst_score": lgst_score}
        if self.patch_histogram is not None:
            ph = torch.as_tensor(self.patch_histogram.score(logits.argmax(1).cpu()), dtype=torch.float64)
            out["patchhist_score"] = ph
            if {"LGST", "patchhist"} <= set(self.stats):
                (ml, sl), (mp, sp) = self.stats["LGST"], self.stats["patchhist"]
                out["score"] = (lgst_score.double().cpu() - ml) / sl + (ph - mp) / sp
        return out
