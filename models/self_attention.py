"""SA-PatchCore's parameter-free self-attention: per channel, softmax(m m^T) m over the spatial positions."""
from __future__ import annotations

import torch


def channel_self_attention(x: torch.Tensor, chunk_elems: int = 2 ** 25) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W); for each channel c with flattened map m (length N = H*W):

        out[i] = sum_j m[j] * exp(m[i] m[j]) / sum_k exp(m[i] m[k])

    No projections, scaling, heads, residual or normalisation (official SA-PatchCore). The N x N logits exist per
    channel, so (batch * channel) rows are processed in chunks of at most `chunk_elems` logits to bound memory.
    """
    b, c, h, w = x.shape
    n = h * w
    m = x.reshape(b * c, n)
    rows = max(1, chunk_elems // (n * n))
    out = torch.empty_like(m)
    for s in range(0, len(m), rows):
        mc = m[s:s + rows]
        attn = torch.softmax(mc[:, :, None] * mc[:, None, :], dim=-1)  # row-wise softmax, stable (max-subtracted)
        out[s:s + rows] = (attn @ mc[:, :, None])[..., 0]
    return out.reshape(b, c, h, w)
