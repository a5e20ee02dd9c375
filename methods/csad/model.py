"""The fused CSAD model (Hsieh & Lai, BMVC 2024; the official deployable model `Tokichan/CSAD export_model.py` /
`models/onnx_model.py`): the component segmentor + Patch Histogram of stage 2 (`PatchHistModel`) and the LGST of
stage 3 (`LGSTDetector`) on one frozen backbone that runs once per image (`FusedCSAD`). The image score is the sum
of the two branch scores, each z-normalised with trimmed (q20-q80) statistics of its validation scores: the number
benchmark_performance.py computes for patchhist+LGST from the score files (evaluation.fusion.fuse).

    model = CSADModel.from_parts("ckpt/segmentor_juice_bottle_256.pth", "ckpt/best_juice_bottle.pth")
    model.save("ckpt/csad_juice_bottle.pth")            # one self-describing file (meta method "csad")
    model, meta = load_model("ckpt/csad_juice_bottle.pth")
    pred = model.predict(ImageList(paths))              # scores: fused; maps: LGST; extra: {"LGST", "patchhist"}

CSAD.py writes ckpt/csad_<category>.pth after training (or --test-only) whenever the segmentor checkpoint of the
category exists at the LGST resolution (ckpt/segmentor_<category>_<input size>.pth, or --segmentor-checkpoint).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common import get_logger
from common.checkpoints import META_KEY, check_meta, checkpoint_meta
from common.config import opt
from common.errors import CheckpointError, UserError
from methods.base import (BACKBONE_STATE_KEY, AnomalyModel, Prediction, backbone_from_checkpoint,
                          backbone_state_if_random, batched, check_backbone, holds_state, reduced_precision)
from methods.csad.fused_inference import FusedCSAD
from methods.csad.lgst import METHOD as LGST_METHOD
from methods.csad.lgst import TEACHER_LAYERS, LGSTConfig, LGSTDetector, as_stack, to_input
from methods.csad.segmentor import METHOD as SEGMENTOR_METHOD
from methods.csad.segmentor import PatchHistModel, SegmentorConfig
from models.segmentor import ENCODER_LAYERS

METHOD = "csad"
BRANCHES = ("patchhist", "LGST")  # evaluation.benchmark.CSAD_BRANCHES: the fused score sums both
# the provenance fields both parts must share (common.checkpoints.CHECKED, method aside)
SHARED_FIELDS = ("dataset", "category", "backbone", "weights_sha256", "train_images")
log = get_logger("csad.model")


@dataclass
class CSADConfig:
    """Inference settings of the fused model (the parts keep their own training settings)."""
    batch_size: int = opt(16, "images per forward pass")
    dtype: str = opt("fp32", "inference precision (bf16 / fp16 approximate)", choices=("fp32", "bf16", "fp16"))

    @classmethod
    def fast(cls, **over) -> "CSADConfig":
        return cls(**over)  # nothing to shrink: inference only


def fused_path(ckpt_dir: str | Path, category: str) -> Path:
    return Path(ckpt_dir) / f"csad_{category.replace('/', '__')}.pth"


def _read(part: str | Path | Mapping, kind: str, fix: str) -> tuple[dict, str]:
    """(checkpoint dict, name for messages) of a path or an already loaded checkpoint."""
    from common.io import load_checkpoint

    if isinstance(part, Mapping):
        return dict(part), f"the {kind} checkpoint"
    ckpt = load_checkpoint(part, hint=fix)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{part} is not a checkpoint of this project (it holds a {type(ckpt).__name__}); {fix}")
    return dict(ckpt), str(part)


def _known(cls: type, d: Mapping | None) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (d or {}).items() if k in names}


class CSADModel(AnomalyModel):
    """Segmentor + Patch Histogram + LGST on one backbone (`patchhist.backbone is lgst.backbone`).

    predict: Prediction(scores = fused score (float64), maps = the LGST maps ((s, s) float32, the whole image
    resized without a crop, as the LGST score files' TIFFs), extra = {"LGST": ..., "patchhist": ...} branch scores).
    The fused score needs each branch's validation scores: `patchhist.val_scores` and `lgst.val_scores`."""

    method = METHOD

    def __init__(self, patchhist: PatchHistModel, lgst: LGSTDetector, *, cfg: CSADConfig | None = None):
        if patchhist.backbone is not lgst.backbone:
            raise ValueError("CSADModel: the segmentor and LGST must share one backbone object (one pass per image)")
        if patchhist.resolution != lgst.cfg.input_size:
            raise ValueError(f"CSADModel: the segmentor works at {patchhist.resolution} px, LGST at "
                             f"{lgst.cfg.input_size} px; one backbone pass needs one input size")
        self.patchhist, self.lgst = patchhist, lgst
        self.cfg = cfg if cfg is not None else CSADConfig(batch_size=lgst.batch_size)
        self.meta: dict = {}  # the provenance record of the checkpoint it was loaded from
        self._fused: FusedCSAD | None = None

    @classmethod
    def build(cls, backbone: nn.Module, *, lgst_cfg: LGSTConfig | None = None,
              segmentor_cfg: SegmentorConfig | None = None, device: Any = "cpu", seed: int = 0,
              cfg: CSADConfig | None = None) -> "CSADModel":
        """An unfitted model on `backbone`; the segmentor resolution defaults to the LGST input size."""
        lgst_cfg = lgst_cfg if lgst_cfg is not None else LGSTConfig()
        if segmentor_cfg is None:
            segmentor_cfg = SegmentorConfig(resolution=lgst_cfg.input_size)
        patchhist = PatchHistModel(backbone, segmentor_cfg, device=device)
        return cls(patchhist, LGSTDetector(backbone, lgst_cfg, device=device, seed=seed), cfg=cfg)

    # --- settings read by other code (predict.py: cfg.dtype, batch_size) ---
    @property
    def backbone(self) -> nn.Module:
        return self.lgst.backbone

    @property
    def device(self) -> torch.device:
        return self.lgst.device

    @property
    def resolution(self) -> int:
        return self.lgst.cfg.input_size

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    @batch_size.setter
    def batch_size(self, n: int) -> None:
        self.cfg.batch_size = int(n)

    @property
    def fused(self) -> FusedCSAD:
        """The one-pass module (built once both parts are fitted)."""
        if self._fused is None:
            ph = self.patchhist
            if ph.segmentor is None or ph.patch_histogram is None or ph.val_scores is None:
                raise RuntimeError("CSADModel: the segmentor part is not fitted; call fit() or load a checkpoint")
            if self.lgst.val_scores is None:
                raise RuntimeError("CSADModel: the LGST part has no validation scores; call fit() or from_parts()")
            val = {"LGST": np.asarray(self.lgst.val_scores), "patchhist": np.asarray(ph.val_scores)}
            self._fused = FusedCSAD(self.backbone, ph.segmentor, self.lgst.model, ph.patch_histogram, val,
                                    resolution=self.resolution).to(self.device).eval()
        return self._fused

    # --- fit: stage 2, then stage 3, on the same images ---
    def fit(self, train: Sequence[Any], *, labels, validation: Sequence[Any], penalty=None, segmentor_seed: int = 42,
            lgst_seed: int = 0, workers: int = 0) -> "CSADModel":
        """Train the segmentor + Patch Histogram on `labels` (methods.csad.segmentor.PseudoLabels of `train`),
        then LGST; each part seeded as its script seeds it (train_segmentor.py 42, CSAD.py --seed). `validation`
        normalises both branches (LGST's map quantiles need it); `penalty`: LGST's natural-image samples."""
        from common import seed_everything

        if validation is None or not len(validation):
            raise UserError("CSADModel.fit needs validation images (LGST normalises its maps with them)")
        seed_everything(segmentor_seed)
        self.patchhist.fit(train, labels=labels, validation=validation, seed=segmentor_seed)
        seed_everything(lgst_seed)
        self.lgst.fit(train, validation=validation, penalty=penalty, seed=lgst_seed, workers=workers)
        self._fused = None
        return self

    # --- inference ---
    def preprocess(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """The input of both branches: (B, 3, s, s) ImageNet-normalised on the device (bilinear resize of the whole
        image; the same pixels PatchHistModel.preprocess gives)."""
        return self.lgst.preprocess(images)

    @torch.no_grad()
    def forward_networks(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One backbone pass, the segmentor head and LGST's teacher, student and autoencoder on a preprocessed
        batch: (segmentation logits, M_st, M_ae)."""
        f = self.fused
        with reduced_precision(self.cfg.dtype, self.device):
            feats = f.extractor(batch.to(self.device))
            logits = f.segmentor({k: feats[k] for k in ENCODER_LAYERS}, self.resolution)
            m_st, m_ae = f.lgst.raw_maps(batch, feats={k: feats[k] for k in TEACHER_LAYERS})
        return logits, m_st, m_ae

    @torch.no_grad()
    def predict(self, images: Sequence[Any] | torch.Tensor, *, maps: bool = True, desc: str = "predict") -> Prediction:
        """Fused scores, LGST maps and both branch scores of `images`, in batches of cfg.batch_size."""
        f = self.fused
        x = as_stack(images, self.resolution)  # uint8 (N, 3, s, s), the LGST script's loading
        fused, lgst_scores, ph_scores, out_maps = [], [], [], []
        for idx in tqdm(batched(len(x), self.batch_size), desc=desc, leave=False):
            xb = to_input(x[idx.start:idx.stop].to(self.device))
            with reduced_precision(self.cfg.dtype, self.device):  # fp32: a null context, the exact numbers
                out = f(xb)
            fused.append(out["score"].numpy())  # float64, as evaluation.fusion on the float32 LGST scores
            lgst_scores.append(out["lgst_score"].float().cpu().numpy())
            ph_scores.append(out["patchhist_score"].numpy())
            if maps:
                out_maps.extend(m.numpy() for m in out["lgst_map"].float().cpu())
        return Prediction(scores=np.concatenate(fused).astype(np.float64), maps=out_maps if maps else None,
                          extra={"LGST": np.concatenate(lgst_scores).astype(np.float64),
                                 "patchhist": np.concatenate(ph_scores).astype(np.float64)})

    # --- checkpoint: both parts in one file, the backbone state once (random weights only) ---
    def checkpoint(self) -> dict:
        self.fused  # noqa: B018  (refuses an unfitted model before anything is written)
        seg = self.patchhist.checkpoint()
        lg = self.lgst.checkpoint()
        for part, meta in ((seg, self.patchhist.meta), (lg, self.lgst.meta)):
            part.pop(BACKBONE_STATE_KEY, None)
            if meta:
                part[META_KEY] = dict(meta)
        return {"segmentor": seg, "LGST": lg, "csad_config": asdict(self.cfg),
                **backbone_state_if_random(self.backbone)}

    def record(self, *, dataset: str | None = None, category: str | None = None,
               train_samples: Sequence[Any] | None = None) -> dict:
        """The fused file's provenance record (common.checkpoints.checkpoint_meta): dataset, category and training
        images from the parts' records unless given; config = each part's recorded config."""
        seg, lg = self.patchhist.meta, self.lgst.meta
        meta = checkpoint_meta(method=METHOD, dataset=dataset or lg.get("dataset") or seg.get("dataset"),
                               category=category or lg.get("category") or seg.get("category"), model=self.backbone,
                               config={"segmentor": seg.get("config"), "LGST": lg.get("config")},
                               train_samples=train_samples,
                               finished=bool(seg.get("finished", True) and lg.get("finished", True)),
                               parts={"segmentor": {k: seg.get(k) for k in ("commit", "seed")},
                                      "LGST": {k: lg.get(k) for k in ("commit", "seed")}})
        if train_samples is None:
            meta["train_images"] = lg.get("train_images") or seg.get("train_images")
        return meta

    def save(self, path: str | Path, meta: Mapping | None = None) -> Path:
        """AnomalyModel.save with `record()` unless a record is given."""
        return super().save(path, meta if meta is not None else self.record())

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping, *, device: Any = "cpu", weights: Any = None,
                        backbone: nn.Module | None = None) -> "CSADModel":
        """The fused model of a csad_<category>.pth checkpoint; the backbone is rebuilt once
        (methods.base.backbone_from_checkpoint: `weights` or the default file) unless given."""
        missing = [k for k in ("segmentor", "LGST") if not isinstance(ckpt.get(k), Mapping)]
        if missing:
            raise CheckpointError(f"not a fused CSAD checkpoint (no {' or '.join(missing)} part); re-create it with "
                                  f"CSAD.py --test-only next to the segmentor checkpoint of train_segmentor.py")
        backbone = _shared_backbone(ckpt, backbone, weights)
        patchhist = PatchHistModel.from_checkpoint(ckpt["segmentor"], device=device, backbone=backbone)
        lgst = LGSTDetector.from_checkpoint(ckpt["LGST"], device=device, backbone=backbone)
        model = cls(patchhist, lgst, cfg=CSADConfig(**_known(CSADConfig, ckpt.get("csad_config"))))
        model.meta = dict(ckpt.get(META_KEY) or {})
        return model

    @classmethod
    def from_parts(cls, segmentor: str | Path | Mapping, lgst: str | Path | Mapping, *, device: Any = "cpu",
                   weights: Any = None, backbone: nn.Module | None = None,
                   lgst_val_scores: Sequence[float] | None = None, cfg: CSADConfig | None = None,
                   allow_unfinished: bool = False) -> "CSADModel":
        """The fused model of a segmentor checkpoint (train_segmentor.py) and an LGST checkpoint (CSAD.py), each a
        path or a loaded dict. Both must be finished runs on the same dataset, category, training images,
        backbone and weights, at one resolution. `backbone`: an already built one to share (used when it holds
        the checkpoints' weights). `lgst_val_scores`: the LGST validation scores, for LGST checkpoints of older
        versions that do not hold them."""
        fix_seg = "train it with train_segmentor.py (the LGST run's dataset, category, backbone and weights)"
        fix_lgst = "train it with CSAD.py (the segmentor run's dataset, category, backbone and weights)"
        seg_ckpt, seg_name = _read(segmentor, "segmentor", fix_seg)
        lg_ckpt, lg_name = _read(lgst, "LGST", fix_lgst)
        metas = {}
        for name, ck, method, fix in ((seg_name, seg_ckpt, SEGMENTOR_METHOD, fix_seg),
                                      (lg_name, lg_ckpt, LGST_METHOD, fix_lgst)):
            # refuses a record-less checkpoint, and an unfinished one unless allow_unfinished (then warns)
            meta = check_meta(name, ck, {}, fix=fix, allow_unfinished=allow_unfinished, logger=log)
            if meta.get("method") != method:
                raise CheckpointError(f"{name} is a {meta.get('method')} checkpoint, not a {method} one; pass the "
                                      f"{'segmentor' if method == SEGMENTOR_METHOD else 'LGST'} checkpoint there")
            metas[method] = meta
        sm, lm = metas[SEGMENTOR_METHOD], metas[LGST_METHOD]
        for key in SHARED_FIELDS:
            a, b = sm.get(key), lm.get(key)
            if a is not None and b is not None and a != b:
                raise CheckpointError(f"{seg_name} and {lg_name} come from different runs ({key} {a} vs {b}); "
                                      f"the fused model needs both parts trained on the same data and backbone")
        res = (seg_ckpt.get("segmentor_config") or {}).get("resolution")
        size = (lg_ckpt.get("config") or {}).get("input_size")
        if res != size:
            raise CheckpointError(f"{seg_name} works at {res} px but {lg_name} at {size} px; the fused model runs "
                                  f"the backbone once on one input: train both at one size (train_segmentor.py "
                                  f"--resolution {size} or CSAD.py --input-size {res})")
        if backbone is not None and BACKBONE_STATE_KEY in lg_ckpt:
            if not holds_state(backbone, lg_ckpt[BACKBONE_STATE_KEY]):
                backbone = None  # random weights: the checkpoints' own
        if backbone is None:
            backbone = backbone_from_checkpoint(lg_ckpt, weights=weights)
        try:
            patchhist = PatchHistModel.from_checkpoint(seg_ckpt, device=device, backbone=backbone)
        except CheckpointError as exc:
            if "random" not in str(exc):
                raise CheckpointError(f"{seg_name}: {exc}") from None
            raise CheckpointError(f"{seg_name} and {lg_name} were made with different random {lm.get('backbone')} "
                                  f"weights, but the fused model runs one backbone: train both parts with the same "
                                  f"real weights (or the same --seed)") from None
        det = LGSTDetector.from_checkpoint(lg_ckpt, device=device, backbone=backbone)
        if lgst_val_scores is not None:
            det.val_scores = np.asarray(lgst_val_scores, dtype=np.float32)
        if det.val_scores is None:
            raise CheckpointError(f"{lg_name} holds no LGST validation scores (an older version wrote it); re-create "
                                  f"it with CSAD.py, or pass lgst_val_scores (the {{category}}_LGST_val_score.npy "
                                  f"values)")
        model = cls(patchhist, det, cfg=cfg if cfg is not None else CSADConfig(batch_size=det.batch_size))
        return model


def _shared_backbone(ckpt: Mapping, backbone: nn.Module | None, weights: Any) -> nn.Module:
    """The backbone of a fused checkpoint: `backbone` when it is the recorded one, else rebuilt."""
    meta = ckpt.get(META_KEY) or {}
    if backbone is not None:
        if BACKBONE_STATE_KEY in ckpt:
            if holds_state(backbone, ckpt[BACKBONE_STATE_KEY]):
                return backbone
        else:
            check_backbone(meta, backbone, where="the fused checkpoint")
            return backbone
    return backbone_from_checkpoint(ckpt, weights=weights)
