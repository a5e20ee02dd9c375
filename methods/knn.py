"""Exact nearest-neighbour search in bounded memory: torch distance chunks, or faiss-cpu when asked."""
from __future__ import annotations

import torch


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 via the matmul expansion, clamped at 0 (the expansion can dip below by rounding)."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0.0)


def knn(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_elems: int = 2 ** 26,
        squared: bool = False, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, indices) of the k nearest bank rows for every query, each (Q, k), ascending.

    Queries and bank rows are processed in blocks so that no distance block exceeds `chunk_elems` entries,
    whatever the bank size. Computed in float64-free float32 like faiss; `squared` returns squared L2.
    """
    if backend == "faiss":
        return _knn_faiss(queries, bank, k, squared)
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
    dist = torch.cat(out_d)
    return (dist if squared else dist.sqrt()), torch.cat(out_i)


def _knn_faiss(queries: torch.Tensor, bank: torch.Tensor, k: int, squared: bool):
    try:
        import faiss
    except ImportError:
        raise RuntimeError("backend 'faiss' needs faiss-cpu (pip install faiss-cpu) or use the torch backend") from None
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.detach().float().cpu().contiguous().numpy())
    d, i = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    d = torch.from_numpy(d).clamp_min_(0.0).to(queries.device)
    return (d if squared else d.sqrt()), torch.from_numpy(i).to(queries.device)
