"""Model-driven part of stage 1 for one image (`Tokichan/CSAD pseudo_label.py`, `grounding_segmentation` and `segmentation`): Grounded-SAM, SAM background, SAM automatic
masks, followed by the post-processing in .masks. Models are built once by the caller and passed in."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import masks as M
from .config import CategoryConfig, background_terms, is_background_phrase


@dataclass
class ImageMasks:
    """Everything stage 1 saves per image (uint8 id maps and bool masks at full resolution)."""
    grounding_mask: np.ndarray      # instance ids from Grounded-SAM
    grounding_background: np.ndarray
    all_masks: np.ndarray           # instance ids before de-overlap
    refined_masks: np.ndarray       # instance ids after de-overlap (the components used for clustering)
    background: np.ndarray          # SAM corner-prompt background
    n_boxes: int = 0


def _amg_class():
    from segment_anything_hq import SamAutomaticMaskGenerator

    class AutomaticMaskGenerator(SamAutomaticMaskGenerator):
        """segment-anything builds a 1-d `crop_boxes` tensor for a crop without masks, and the cross-crop NMS
        then fails when no crop found anything; give it the (0, 4) shape so "no masks" is simply empty."""

        def _process_crop(self, *args, **kwargs):
            data = super()._process_crop(*args, **kwargs)
            if len(data["rles"]) == 0:
                data["crop_boxes"] = torch.zeros((0, 4))
            return data

    return AutomaticMaskGenerator


class Segmenter:
    """Holds the models; `segment(image, cfg)` runs both steps on one RGB uint8 image."""

    # Boxes per HQ-SAM decoder call. Each box decodes independently, so chunks give the same masks; one call
    # for all boxes holds (boxes x H x W) float logits at full resolution (Grounding DINO may return up to
    # 900 boxes: >20 GB on an 800 x 1600 LOCO image).
    box_chunk = 64

    def __init__(self, grounder, sam, amg_params: dict, *, official_background_match: bool = False,
                 amg_for_no_sam: bool = False):
        from segment_anything_hq import SamPredictor

        self.grounder = grounder
        self.predictor = SamPredictor(sam)
        self.amg = _amg_class()(sam, **amg_params)
        self.official_background_match = official_background_match
        self.amg_for_no_sam = amg_for_no_sam  # official: runs AMG for no_sam categories, then discards it

    @torch.no_grad()
    def box_masks(self, image: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(boxes, H, W) bool HQ-SAM masks (multimask_output=False, hq_token_only=False), `box_chunk` boxes
        per decoder call."""
        h, w = image.shape[:2]
        if len(boxes_xyxy) == 0:
            return M.empty_stack((h, w))
        device = self.predictor.device
        boxes = self.predictor.transform.apply_boxes_torch(torch.as_tensor(boxes_xyxy, device=device), (h, w))
        out = np.empty((len(boxes), h, w), bool)
        for i in range(0, len(boxes), self.box_chunk):
            masks, _, _ = self.predictor.predict_torch(point_coords=None, point_labels=None,
                                                       boxes=boxes[i:i + self.box_chunk], multimask_output=False,
                                                       hq_token_only=False)
            out[i:i + self.box_chunk] = masks[:, 0].cpu().numpy()
        return out

    @torch.no_grad()
    def sam_background(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        pts = M.sam_background_points(h, w)
        out, _, _ = self.predictor.predict(point_coords=pts, point_labels=np.ones(len(pts), np.int64),
                                           multimask_output=False, hq_token_only=False)
        return out[0].astype(bool)

    def generate(self, image: np.ndarray) -> list[dict]:
        return self.amg.generate(image)

    def grounded_sam(self, image: np.ndarray, cfg: CategoryConfig) -> tuple[np.ndarray, np.ndarray, int]:
        """(grounding instance-id map, grounding background, number of boxes). The SAM image must be set."""
        h, w = image.shape[:2]
        boxes, _, phrases = self.grounder.predict(image, cfg.text_prompt, cfg.box_threshold, cfg.text_threshold)
        masks = self.box_masks(image, boxes)
        terms = background_terms(cfg.background_prompt, official=self.official_background_match)
        is_bg = np.array([is_background_phrase(p, terms) for p in phrases], dtype=bool)
        background = masks[is_bg].any(0) if is_bg.any() else np.zeros((h, w), bool)
        fg = masks[~is_bg]
        min_frac = cfg.settings.min_instance_fraction
        if cfg.filter_by_combine:
            fg = M.filter_by_combine(fg, min_fraction=min_frac)
        return M.merge_masks(fg, min_fraction=min_frac), background, len(boxes)

    def segment(self, image: np.ndarray, cfg: CategoryConfig) -> ImageMasks:
        h, w = image.shape[:2]
        min_frac = cfg.settings.min_instance_fraction
        self.predictor.set_image(image)  # RGB; the encoder runs once for boxes and background points
        grounding, g_background, n_boxes = self.grounded_sam(image, cfg)
        background = self.sam_background(image)
        if cfg.no_sam and not self.amg_for_no_sam:
            # Components come from Grounded-SAM; SAM AMG output would be discarded, so it is not computed.
            comps = M.instances_from_id_map(grounding)
            all_masks = M.merge_masks(comps, min_fraction=min_frac)
            refined = M.merge_masks(M.filter_by_combine(comps, min_fraction=min_frac), min_fraction=min_frac)
            return ImageMasks(grounding, g_background, all_masks, refined, background, n_boxes)
        generated = self.generate(image)
        raw = M.as_stack([g["segmentation"] for g in generated], (h, w))
        comps = M.split_components(raw)
        if cfg.use_grounding_filter:
            comps = M.grounding_filter(comps, grounding > 0)
        comps = M.remove_background(comps, background)
        comps = M.remove_background(comps, g_background)
        all_masks = M.merge_masks(comps, min_fraction=0.0)
        refined = M.merge_masks(M.filter_by_combine(comps, min_fraction=min_frac), min_fraction=min_frac)
        if cfg.no_sam:  # official behaviour (--amg-for-no-sam): the AMG result is replaced by Grounded-SAM's
            refined = M.merge_masks(M.filter_by_combine(M.instances_from_id_map(grounding), min_fraction=min_frac),
                                    min_fraction=min_frac)
        return ImageMasks(grounding, g_background, all_masks, refined, background, n_boxes)
