"""Exact nearest-neighbour search in bounded memory: torch distance chunks, or faiss-cpu when asked.

Non-finite inputs are refused: a NaN query or bank row would otherwise come back as a huge finite distance
(faiss reports 3.4e38, the matmul expansion 1.8e19 after clamping) and end up in a score file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from common.errors import NonFiniteError, UserError, _kind, require_finite, weights_cause  # noqa: F401 (re-exported)


def check_features(feats: torch.Tensor, images: torch.Tensor, samples: Sequence[Any], backbone: Any,
                   what: str = "features") -> None:
    """Refuse non-finite per-image features (B, ...) with the first such image and the cause (the decoded image
    itself, or the backbone weights). One reduction per batch; the diagnosis runs only on failure."""
    if bool(torch.isfinite(feats).all()):
        return
    bad = (~torch.isfinite(feats.reshape(len(feats), -1))).any(1).nonzero()[:, 0].tolist()
    i = bad[0]
    name = Path(getattr(samples[i], "path", samples[i])) if samples else f"image {i}"
    if not bool(torch.isfinite(images[i]).all()):
        cause = f"the image itself decodes to non-finite values; replace {name}"
    else:
        cause = weights_cause(backbone) + " (the image is finite)"
    n = f" (and {len(bad) - 1} more images of this batch)" if len(bad) > 1 else ""
    raise NonFiniteError(f"{what} of {name}{n} are {_kind(feats[i])}: {cause}")


def check_bank(bank: torch.Tensor, source: str = "") -> None:
    require_finite(bank, f"the memory bank{' ' + source if source else ''}", "it was built from non-finite "
                   "features; rebuild it (without --test-only) with finite backbone weights")


def _check_inputs(queries: torch.Tensor, bank: torch.Tensor | None) -> None:
    if bank is not None:
        check_bank(bank)
    require_finite(queries, "the nearest-neighbour queries", "the test features are not finite; check the backbone "
                   "weights and the images")


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 via the matmul expansion, clamped at 0 (the expansion can dip below by rounding)."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0.0)


def knn(queries: torch.Tensor, bank: torch.Tensor, *, k: int = 1, chunk_elems: int = 2 ** 26,
        squared: bool = False, backend: str = "torch",
        bank_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, indices) of the k nearest bank rows for every query, each (Q, k), ascending.

    Queries and bank rows are processed in blocks so that no distance block exceeds `chunk_elems` entries,
    whatever the bank size. Computed in float64-free float32 like faiss; `squared` returns squared L2.
    Non-finite queries, bank rows or distances raise NonFiniteError (`bank_checked`: the caller already checked
    the bank once, so it is not re-scanned for every batch).
    """
    _check_inputs(queries, None if bank_checked else bank)
    dist, idx = _knn_faiss(queries, bank, k) if backend == "faiss" else _knn_torch(queries, bank, k, chunk_elems)
    require_finite(dist, "nearest-neighbour distances", "the features are finite but too large for float32; "
                   "check the backbone weights")
    return (dist if squared else dist.sqrt()), idx


def _knn_torch(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_elems: int):
    """Squared distances and indices, in query/bank blocks of at most `chunk_elems` distances."""
    q_chunk = max(1, min(len(queries), chunk_elems // max(1, min(len(bank), chunk_elems))))
    b_chunk = max(k, min(len(bank), chunk_elems // q_chunk))
    out_d, out_i = [], []
    for qs in range(0, len(queries), q_chunk):
        q = queries[qs:qs + q_chunk]
        best_d = best_i = None
        for bs in range(0, len(bank), b_chunk):
            d = pairwise_sq_dists(q, bank[bs:bs + b_chunk])
            kk = min(k, d.shape[1])
            dd, ii = d.topk(kk, dim=1, largest=False)
            ii = ii + bs
            if best_d is not None:
                dd, sel = torch.cat([best_d, dd], 1).topk(min(k, best_d.shape[1] + kk), dim=1, largest=False)
                ii = torch.cat([best_i, ii], 1).gather(1, sel)
            best_d, best_i = dd, ii
        out_d.append(best_d)
        out_i.append(best_i)
    return torch.cat(out_d), torch.cat(out_i)


def _knn_faiss(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """Squared distances (clamped at 0) and indices from faiss-cpu, on the queries' device."""
    try:
        import faiss
    except ImportError:
        raise RuntimeError("backend 'faiss' needs faiss-cpu (pip install faiss-cpu) or use the torch backend") from None
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.detach().float().cpu().contiguous().numpy())
    d, i = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    if k <= len(bank) and (i < 0).any():  # faiss marks a missing neighbour with index -1 and distance 3.4e38
        raise NonFiniteError("faiss found no neighbour for some queries; use --knn-backend torch")
    return torch.from_numpy(d).clamp_min_(0.0).to(queries.device), torch.from_numpy(i).to(queries.device)
