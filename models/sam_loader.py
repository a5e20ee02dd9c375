"""HQ-SAM (segment-anything-hq) from local checkpoint files, plus a tiny random-weight HQ-SAM for tests and --fast.

Nothing is downloaded: a missing checkpoint raises an error naming the file and its download URL.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from common.errors import CheckpointError
from models.grounding import ModelFileNotFoundError

REPO_ROOT = Path(__file__).resolve().parent.parent
HQ_SAM_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/{}"  # also linked from github.com/SysCV/sam-hq
SAM_FILES = {
    "vit_h": "sam_hq_vit_h.pth",
    "vit_l": "sam_hq_vit_l.pth",
    "vit_b": "sam_hq_vit_b.pth",
    "vit_tiny": "sam_hq_vit_tiny.pth",
}
RANDOM = "random"        # the named architecture with random weights (shape tests)
TINY_RANDOM = "tiny"     # a small ViT HQ-SAM at 128 px with random weights (--fast, tests)


def sam_checkpoint_path(model_type: str, ckpt_dir: str | os.PathLike | None = None) -> Path:
    if model_type not in SAM_FILES:
        raise ValueError(f"unknown HQ-SAM model '{model_type}'; choose from: {', '.join(SAM_FILES)}")
    return Path(ckpt_dir or REPO_ROOT / "ckpt") / SAM_FILES[model_type]


def load_sam(model_type: str = "vit_h", checkpoint: str | os.PathLike | None = None,
             ckpt_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """An HQ-SAM model in eval mode with gradients off.

    checkpoint: None -> <ckpt_dir>/sam_hq_<model>.pth; a path; "random" (architecture of `model_type`, random
    weights); "tiny" (build_tiny_sam, random weights).
    """
    from common.io import load_checkpoint
    from segment_anything_hq import sam_model_registry

    if checkpoint == TINY_RANDOM:
        sam = build_tiny_sam()
    else:
        path = None if checkpoint == RANDOM else Path(checkpoint) if checkpoint else sam_checkpoint_path(model_type, ckpt_dir)
        if model_type not in SAM_FILES:
            raise ValueError(f"unknown HQ-SAM model '{model_type}'; choose from: {', '.join(SAM_FILES)}")
        if path is not None and not path.is_file():
            raise ModelFileNotFoundError(f"HQ-SAM checkpoint not found: {path}; download {SAM_FILES[model_type]} from "
                                    f"{HQ_SAM_URL.format(SAM_FILES[model_type])} into ckpt/ (or pass --sam-ckpt)")
        sam = sam_model_registry[model_type](checkpoint=None)
        if path is not None:
            state = load_checkpoint(path, hint=f"download it from {HQ_SAM_URL.format(SAM_FILES[model_type])}")
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
            try:  # strict=False: HQ-SAM files may carry extra tensors; missing ones are an error below
                missing, _ = sam.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # shape mismatch: another model size
                raise CheckpointError(f"{path} does not fit HQ-SAM {model_type}: {str(exc).splitlines()[1].strip()}; "
                                   "pass the matching --sam-model") from None
            if missing:
                raise CheckpointError(f"{path} does not fit HQ-SAM {model_type}: {len(missing)} missing tensors "
                                   f"(e.g. {missing[0]}); pass the matching --sam-model")
    return sam.to(device).eval().requires_grad_(False)


def build_tiny_sam(image_size: int = 128, embed_dim: int = 64, depth: int = 2, prompt_dim: int = 64, seed: int = 0):
    """HQ-SAM with the vit_h code path (ImageEncoderViT + MaskDecoderHQ) but a 2-block, 64-dim encoder at
    `image_size` px and a 64-dim decoder (256 in the real models), random weights. Masks are meaningless; shapes,
    prompts and post-processing are real."""
    from segment_anything_hq.modeling import ImageEncoderViT, MaskDecoderHQ, PromptEncoder, Sam, TwoWayTransformer

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        patch = 16
        sam = Sam(
            image_encoder=ImageEncoderViT(depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=2,
                                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2,
                                          patch_size=patch, qkv_bias=True, use_rel_pos=True,
                                          global_attn_indexes=[depth - 1], window_size=4, out_chans=prompt_dim),
            prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(image_size // patch,) * 2,
                                         input_image_size=(image_size, image_size), mask_in_chans=16),
            mask_decoder=MaskDecoderHQ(num_multimask_outputs=3,
                                       transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_dim, mlp_dim=128,
                                                                     num_heads=4),
                                       transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=64,
                                       vit_dim=embed_dim),
            pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    finally:
        torch.random.set_rng_state(gen_state)
    return sam.eval().requires_grad_(False)
