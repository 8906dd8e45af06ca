"""Guidance weights g_t (METHOD.md, "Guidance"), computed from the block of attention logits that is needed.

All functions take post-RoPE queries and keys of one layer and never build the N x N attention matrix:
only queries x prompt keys (faithful) or prompt queries x keys (text_to_vision) are formed, in fp32.
Shapes: q (B, H, N, Dh), k (B, Hkv, N, Dh) with H a multiple of Hkv (GQA keys are repeated).
"""

from __future__ import annotations

import torch

__all__ = ["GUIDANCE_MODES", "gather_rows", "faithful_guidance", "text_to_vision_guidance"]

GUIDANCE_MODES = ("faithful", "uniform", "text_to_vision")


def gather_rows(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the True entries of each row, right-padded: index (B, P) long and valid (B, P) bool.

    width: P when the caller knows it (the most True entries of a row); otherwise it is read from the device.
    """
    counts = mask.sum(dim=1)
    if width is not None:
        P = max(width, 1)
    else:
        P = max(int(counts.max()), 1) if mask.shape[0] else 1
    # stable sort puts True slots first, in order
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :P]
    valid = torch.arange(P, device=mask.device)[None, :] < counts[:, None]
    return order, valid


def _repeat_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    groups = n_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def faithful_guidance(q: torch.Tensor, k: torch.Tensor, prompt_mask: torch.Tensor, token_valid: torch.Tensor,
                      scaling: float, head_chunk: int = 8, width: int | None = None) -> torch.Tensor:
    """g_i = sum_h sum_{j in P} softmax over queries i' of s^h_{i'j}, evaluated at i.

    prompt_mask: (B, N) bool, the prompt keys P (non-vision, non-padding).
    token_valid: (B, N) bool, real tokens; padding never acts as a query.
    width: the most prompt keys of a row, when known (``gather_rows``). Returns (B, N) fp32 weights (zero on
    padding).
    """
    B, H, N, _ = q.shape
    key_index, key_valid = gather_rows(prompt_mask, width)  # (B, P)
    k_prompt = k.gather(2, key_index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3]))
    k_prompt = _repeat_kv(k_prompt, H)
    weights = torch.zeros(B, N, dtype=torch.float32, device=q.device)
    query_pad = ~token_valid[:, None, :, None]
    for h0 in range(0, H, head_chunk):
        logits = torch.matmul(q[:, h0:h0 + head_chunk].float(),
                              k_prompt[:, h0:h0 + head_chunk].float().transpose(2, 3)) * scaling  # (B, h, N, P)
        logits = logits.masked_fill(query_pad, float("-inf"))
        probs = torch.softmax(logits, dim=2)  # over queries
        probs = probs * key_valid[:, None, None, :]
        weights += probs.sum(dim=(1, 3))
    return weights.nan_to_num_(0.0)  # a row without any real token


def text_to_vision_guidance(q: torch.Tensor, k: torch.Tensor, text_mask: torch.Tensor, token_valid: torch.Tensor,
                            scaling: float, head_chunk: int = 8, width: int | None = None) -> torch.Tensor:
    """g_i = sum_h sum_{j in T} causal softmax over keys of s^h_{ji}: how much the text attends to token i.

    text_mask: (B, N) bool, the text queries T (the caller passes the prompt tokens after the first image;
    causality makes text before an image give it no weight anyway). Slots are in sequence order, so the
    causal mask is slot(key) <= slot(query). width: the most text queries of a row, when known. Returns (B, N)
    fp32 weights.
    """
    B, H, N, _ = q.shape
    query_index, query_valid = gather_rows(text_mask, width)  # (B, T)
    q_text = q.gather(2, query_index[:, None, :, None].expand(-1, H, -1, q.shape[3]))
    k_all = _repeat_kv(k, H)
    slots = torch.arange(N, device=q.device)
    allowed = (slots[None, None, :] <= query_index[:, :, None]) & token_valid[:, None, :]  # (B, T, N)
    allowed |= slots[None, None, :] == query_index[:, :, None]  # keeps padded query rows finite
    weights = torch.zeros(B, N, dtype=torch.float32, device=q.device)
    for h0 in range(0, H, head_chunk):
        logits = torch.matmul(q_text[:, h0:h0 + head_chunk].float(),
                              k_all[:, h0:h0 + head_chunk].float().transpose(2, 3)) * scaling  # (B, h, T, N)
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1) * query_valid[:, None, :, None]
        weights += probs.sum(dim=(1, 2))
    return weights.nan_to_num_(0.0)
