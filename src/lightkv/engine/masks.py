"""Attention masks of shortened decoder layers: pure tensor functions, no model involved.

Vocabulary (B rows, N original tokens, M current slots, K cached slots of one layer, q new tokens):
  orig_index (B, M): original sequence position of each slot; valid (B, M): False on padding slots.
A mask is "allowed" (bool, True = may attend) while it is built, and converted at the end to the format the
attention implementation was given (bool for sdpa without a mask, additive float for eager).
"""

from __future__ import annotations

import torch

__all__ = ["gather_seq", "allowed_from_mask", "to_attention_format", "prefill_mask", "decode_mask"]


def gather_seq(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather along sequence dim ``dim`` of ``t`` (batch at dim ``dim - 1``, may be 1) with index (B, M)."""
    dim = dim % t.dim()
    B, M = index.shape
    shape = list(t.shape)
    shape[dim - 1] = B
    t = t.expand(*shape)
    view = [1] * t.dim()
    view[dim - 1], view[dim] = B, M
    idx = index.view(view)
    expand = list(t.shape)
    expand[dim] = M
    return t.gather(dim, idx.expand(expand))


def allowed_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """4-D attention mask (bool, or additive float) -> bool 'may attend' of the same shape."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def to_attention_format(allowed: torch.Tensor, like: torch.Tensor | None, attn_impl: str,
                        dtype: torch.dtype) -> torch.Tensor:
    """bool 'may attend' -> the format of ``like`` (the mask the model built), or the implementation's own
    format when the model built none (bool for sdpa, additive ``dtype`` for eager)."""
    if like is not None and like.dtype == torch.bool:
        return allowed
    if like is None and attn_impl == "sdpa":
        return allowed
    out_dtype = like.dtype if like is not None else dtype
    zero = torch.zeros((), dtype=out_dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(out_dtype).min)


def prefill_mask(orig_index: torch.Tensor, valid: torch.Tensor, full_mask: torch.Tensor | None,
                 unpadded: bool) -> torch.Tensor | None:
    """(B, 1, M, M) bool mask of a shortened layer at prefill, or None when no mask is needed.

    full_mask: the 4-D mask the model built for the full sequence (None: sdpa without padding, i.e. causal).
    unpadded: no slot of ``valid`` is padding (the caller knows it without reading the device).
    Slots attend to slots whose original position is allowed by ``full_mask`` (causal in original positions
    when it is None); nothing attends to padding, and padding queries also attend to themselves, so no row is
    empty (an empty row is NaN in sdpa).
    """
    B, M = orig_index.shape
    if full_mask is None:
        if unpadded:
            return None
        allowed = orig_index[:, None, :] <= orig_index[:, :, None]  # (B, M, M)
    else:
        if full_mask.dim() != 4:
            raise ValueError(f"lightkv expects a 4-D attention mask inside the decoder, got {full_mask.dim()}-D")
        full_allowed = allowed_from_mask(full_mask)[:, 0].expand(B, -1, -1)
        rows = full_allowed.gather(1, orig_index[:, :, None].expand(B, M, full_allowed.shape[2]))
        allowed = rows.gather(2, orig_index[:, None, :].expand(B, M, M))
    allowed = allowed & valid[:, None, :]
    eye = torch.eye(M, dtype=torch.bool, device=orig_index.device)[None]
    allowed = allowed | (eye & ~valid[:, :, None])
    return allowed[:, None]


def decode_mask(orig_index: torch.Tensor, valid: torch.Tensor, prefill_length: int, decoded: int, q: int,
                full_mask: torch.Tensor | None = None, padding: torch.Tensor | None = None,
                window: int | None = None, keep_last: int | None = None) -> torch.Tensor:
    """(B, 1, q, K) bool mask of a shortened layer for ``q`` new tokens after ``decoded`` earlier ones.

    The layer's keys are K = M + decoded + q slots: the prefill slots ``orig_index`` / ``valid`` (B, M), every
    token appended since, and the new ones. full_mask: the 4-D mask the model built over all prefill_length +
    decoded + q original columns (its columns are gathered); without it, causality in original positions, and
    ``padding`` (B, prefill_length + decoded + q), the call's 2-D padding mask, when given.
    window: a sliding-window layer's window, in original positions (a query at p sees keys at p - window < k).
    keep_last: only the last ``keep_last`` slots are keys (a sliding-window cache layer keeps the last ones).
    """
    B, M = orig_index.shape
    device = orig_index.device
    total = prefill_length + decoded + q
    extra = torch.arange(prefill_length, total, device=device)[None].expand(B, -1)
    cols = torch.cat([orig_index, extra], dim=1)  # (B, K) original column of each cached slot
    col_valid = torch.cat([valid, torch.ones_like(extra, dtype=torch.bool)], dim=1)
    if full_mask is None:
        query_pos = prefill_length + decoded + torch.arange(q, device=device)
        allowed = cols[:, None, :] <= query_pos[None, :, None]
        if padding is not None:
            if padding.shape[-1] != total:
                raise ValueError(f"lightkv: the attention mask covers {padding.shape[-1]} tokens, expected {total} "
                                 "(prompt + generated tokens)")
            allowed = allowed & padding.bool().gather(1, cols)[:, None, :]
    else:
        if full_mask.shape[-1] != total:
            raise ValueError(f"lightkv: decode mask covers {full_mask.shape[-1]} keys, expected {total}")
        full_allowed = allowed_from_mask(full_mask)[:, 0].expand(B, q, -1)
        allowed = full_allowed.gather(2, cols[:, None, :].expand(B, q, cols.shape[1]))
    allowed = allowed & col_valid[:, None, :]
    if window is not None:
        query_pos = prefill_length + decoded + torch.arange(q, device=device)
        allowed = allowed & (cols[:, None, :] > query_pos[None, :, None] - window)
    if keep_last is not None and keep_last < allowed.shape[-1]:
        allowed = allowed[..., allowed.shape[-1] - keep_last:]
    return allowed[:, None]
