"""Grounding DINO (groundingdino-py) from local files, with a transformers 4.x / 5.x compatible BERT wrapper,
plus a tiny random-weight model (and a tiny BERT saved to disk) for tests and --fast.

transformers 5 removed BertModel.get_extended_attention_mask / get_head_mask, which groundingdino-py's
BertModelWarper calls in its constructor. `TextBert` replaces it: same sub-module names (embeddings, encoder,
pooler, so checkpoints load unchanged), and the same maths (the (B, L, L) phrase-block mask becomes an additive
mask fed to BERT's encoder). Nothing is downloaded: the BERT folder and the checkpoint are local paths.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import CheckpointError, UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
GROUNDING_FILE = "groundingdino_swint_ogc.pth"
GROUNDING_URL = "https://github.com/IDEA-Research/GroundingDINO/releases/download/v0.1.0-alpha/groundingdino_swint_ogc.pth"
GROUNDING_SHA256 = "3b3ca2563c77c69f651d7bd133e97139c186df06231157a64c507099c52bc799"
BERT_DIR = "bert-base-uncased"
BERT_URL = ("https://huggingface.co/google-bert/bert-base-uncased (config.json, vocab.txt, tokenizer.json, "
            "tokenizer_config.json, model.safetensors) into ckpt/bert-base-uncased/")
TINY_RANDOM = "tiny"
TINY_CONFIG = dict(hidden_dim=256, nheads=8, enc_layers=1, dec_layers=1, num_queries=20, dim_feedforward=64)
TINY_SWIN = dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])  # Swin-T layout, 1 block per stage
# Activation checkpointing only matters for training; at inference it just adds overhead (same weights).
INFERENCE_CONFIG = dict(use_checkpoint=False, use_transformer_ckpt=False)


class ModelFileNotFoundError(UserError, FileNotFoundError):
    """A model file or folder the user must download; the message names it and where to get it."""


class TextBert(nn.Module):
    """Drop-in for groundingdino's BertModelWarper that works with transformers 4.x and 5.x."""

    def __init__(self, bert_model: nn.Module):
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, **_unused):
        b, n = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        # (B, L) padding mask or (B, L, L) phrase-block mask -> additive (B, 1, L, L) mask (0 keep, min drop)
        keep = attention_mask.bool()
        keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None, :, :]
        additive = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        out = self.encoder(x, attention_mask=additive)
        seq = out[0] if isinstance(out, tuple) else out.last_hidden_state
        pooled = self.pooler(seq) if self.pooler is not None else None
        return {"last_hidden_state": seq, "pooler_output": pooled}


@contextlib.contextmanager
def _patched_build(swin_overrides: dict | None = None):
    """Swap in TextBert (and, for the tiny model, a smaller Swin) while groundingdino-py builds the model."""
    import groundingdino.models.GroundingDINO.backbone.backbone as bb
    import groundingdino.models.GroundingDINO.groundingdino as gd

    original_bert, original_swin = gd.BertModelWarper, bb.build_swin_transformer
    gd.BertModelWarper = TextBert
    if swin_overrides:
        bb.build_swin_transformer = lambda *a, **kw: original_swin(*a, **{**kw, **swin_overrides})
    try:
        yield
    finally:
        gd.BertModelWarper, bb.build_swin_transformer = original_bert, original_swin


def _swint_ogc_config(bert_dir: Path, overrides: dict | None = None):
    import groundingdino.config
    from groundingdino.util.slconfig import SLConfig

    cfg = SLConfig.fromfile(str(Path(groundingdino.config.__file__).parent / "GroundingDINO_SwinT_OGC.py"))
    cfg.text_encoder_type = str(bert_dir)  # a local folder: groundingdino then never contacts the hub
    cfg.device = "cpu"
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    return cfg


def find_bert_dir(bert_dir: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None) -> Path:
    path = Path(bert_dir) if bert_dir else Path(ckpt_dir or REPO_ROOT / "ckpt") / BERT_DIR
    needed = ["config.json", "vocab.txt"]
    if not path.is_dir() or any(not (path / f).is_file() for f in needed):
        raise ModelFileNotFoundError(f"BERT folder not found or incomplete: {path} (needs {', '.join(needed)} and the "
                                f"weights); download {BERT_URL}, or pass --bert-dir")
    return path


def build_grounding_dino(bert_dir: str | os.PathLike, overrides: dict | None = None,
                         swin_overrides: dict | None = None) -> nn.Module:
    """The SwinT-OGC architecture (random init except BERT, which loads from `bert_dir`)."""
    from groundingdino.models import build_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import io
    with _patched_build(swin_overrides), contextlib.redirect_stdout(io.StringIO()):  # it prints the BERT path
        model = build_model(_swint_ogc_config(Path(bert_dir), {**INFERENCE_CONFIG, **(overrides or {})}))
    return model


def load_grounding_dino(checkpoint: str | os.PathLike | None = None, bert_dir: str | os.PathLike | None = None,
                        ckpt_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        tiny_architecture: bool = False) -> nn.Module:
    """Grounding DINO SwinT-OGC in eval mode. checkpoint: None -> ckpt/groundingdino_swint_ogc.pth; a path;
    "tiny" -> build_tiny_grounding_dino(bert_dir) (bert_dir must then hold a tiny BERT, see save_tiny_bert).
    tiny_architecture: load `checkpoint` into the tiny architecture (tests of the loading code)."""
    from common.io import load_checkpoint

    if checkpoint == TINY_RANDOM:
        if bert_dir is None:
            raise ValueError("the tiny Grounding DINO needs bert_dir (a folder written by save_tiny_bert)")
        return build_tiny_grounding_dino(bert_dir).to(device)
    path = Path(checkpoint) if checkpoint else Path(ckpt_dir or REPO_ROOT / "ckpt") / GROUNDING_FILE
    if not path.is_file():
        raise ModelFileNotFoundError(f"Grounding DINO checkpoint not found: {path}; download {GROUNDING_FILE} from "
                                f"{GROUNDING_URL} (sha256 {GROUNDING_SHA256}) into ckpt/, or pass --grounding-ckpt")
    bert = find_bert_dir(bert_dir, ckpt_dir)
    model = build_tiny_grounding_dino(bert) if tiny_architecture else build_grounding_dino(bert)
    state = load_checkpoint(path, hint=f"download it from {GROUNDING_URL}")
    state = state.get("model", state) if isinstance(state, dict) else state
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:  # strict=False as the official loader: the file also holds BERT's position_ids buffer
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit Grounding DINO SwinT-OGC: {str(exc).splitlines()[1].strip()}; "
                           f"re-download it from {GROUNDING_URL}") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"{path} does not fit Grounding DINO SwinT-OGC: {len(missing)} missing tensors "
                           f"(e.g. {missing[0]}); re-download it from {GROUNDING_URL}")
    return model.to(device).eval().requires_grad_(False)


def save_tiny_bert(folder: str | os.PathLike, words: list[str], seed: int = 0) -> Path:
    """A 1-layer, 32-dim random BERT with a word-level vocabulary (the special tokens, '.', '?' and `words`),
    saved with its tokenizer so that AutoTokenizer / BertModel load it from disk like bert-base-uncased."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "-", "(", ")"]
    vocab += sorted({w.lower() for w in words} - set(vocab))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    import inspect

    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers 5 ignores vocab_file
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    else:
        tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's RNG stream is left untouched
        torch.manual_seed(seed)
        BertModel(cfg).save_pretrained(folder)
    return folder


def build_tiny_grounding_dino(bert_dir: str | os.PathLike, seed: int = 0) -> nn.Module:
    """SwinT-OGC code path, random weights: a 32-dim Swin with one block per stage, a 1+1-layer transformer
    (width 256: groundingdino's text position code fixes it) and 20 queries."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build_grounding_dino(bert_dir, TINY_CONFIG, TINY_SWIN)
    finally:
        torch.random.set_rng_state(state)
    return model.eval().requires_grad_(False)


def preprocess_caption(caption: str) -> str:
    caption = caption.lower().strip()
    return caption if caption.endswith(".") else caption + "."


class GroundingPredictor:
    """Boxes and phrases for one caption (`Tokichan/CSAD grounded_sam.py`, `get_grounding_output`): keep a query if its max token probability exceeds
    box_threshold; its phrase = tokens above text_threshold, with the score appended as '(0.35)'."""

    def __init__(self, model: nn.Module, short_side: int = 800, max_size: int = 1333):
        import groundingdino.datasets.transforms as T

        self.model = model
        self.transform = T.Compose([T.RandomResize([short_side], max_size=max_size), T.ToTensor(),
                                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    @torch.no_grad()
    def predict(self, image_rgb: np.ndarray, caption: str, box_threshold: float,
                text_threshold: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """image_rgb: uint8 (H, W, 3). Returns xyxy pixel boxes (n, 4) float32, scores (n,), phrases."""
        from PIL import Image
        from groundingdino.util.utils import get_phrases_from_posmap

        h, w = image_rgb.shape[:2]
        device = next(self.model.parameters()).device
        x, _ = self.transform(Image.fromarray(image_rgb), None)
        caption = preprocess_caption(caption)
        out = self.model(x[None].to(device), captions=[caption])
        probs = out["pred_logits"].sigmoid()[0].cpu()  # (queries, 256 text positions)
        boxes = out["pred_boxes"][0].cpu()  # normalised cxcywh
        best = probs.max(dim=1).values
        keep = best > box_threshold
        probs, boxes, best = probs[keep], boxes[keep], best[keep]
        tokenized = self.model.tokenizer(caption)
        phrases = [get_phrases_from_posmap(p > text_threshold, tokenized, self.model.tokenizer)
                   + f"({str(s.item())[:4]})" for p, s in zip(probs, best)]
        cx, cy, bw, bh = boxes.unbind(1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) * torch.tensor([w, h, w, h])
        return xyxy.numpy().astype(np.float32), best.numpy(), phrases
