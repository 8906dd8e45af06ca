"""A deliberately plain implementation of one LightKV stage (METHOD.md steps 1-6), with Python loops.

Used only to check the batched tensor code in ``lightkv.core``.
"""

from __future__ import annotations

import math

import torch


def bands(size: int, windows: int) -> list[int]:
    """Band of every row: the first size % windows bands get one extra row."""
    base, extra = divmod(size, windows)
    out = []
    for b in range(windows):
        out += [b] * (base + (1 if b < extra else 0))
    return out


def reference_stage(hidden, image_of, rows, cols, grids, guidance, windows, ratio, min_per_window=8,
                    with_destination=False):
    """One stage on one batch row.

    hidden: (N, D) tensor; image_of: list of image id or -1 per slot; rows/cols: lists of grid coordinates;
    grids: {image: (H, W)}; guidance: list of weights or None. Returns (keep list[bool], new hidden (N, D)), and
    with_destination=True the slot each token went to (itself when kept) as a third item.
    """
    N = hidden.shape[0]
    keep = [True] * N
    destination = list(range(N))
    new_hidden = hidden.clone()
    weights = [1.0] * N if guidance is None else [float(g) for g in guidance]
    for image, (H, W) in grids.items():
        slots = [i for i in range(N) if image_of[i] == image]
        if len(slots) < min_per_window * windows * windows:
            continue
        row_band, col_band = bands(H, windows), bands(W, windows)
        by_window: dict[int, list[int]] = {}
        for i in slots:  # slots are in sequence order
            w = row_band[rows[i]] * windows + col_band[cols[i]]
            by_window.setdefault(w, []).append(i)
        for members in by_window.values():
            set_a = members[0::2]
            set_b = members[1::2]
            n = len(members)
            r = min(math.floor(ratio * n), n // 2)
            if r == 0 or not set_b:
                continue
            scores = []
            for rank, a in enumerate(set_a):
                best, best_sim = None, -math.inf
                for b in set_b:
                    sim = torch.nn.functional.cosine_similarity(hidden[a].float(), hidden[b].float(), dim=0).item()
                    if sim > best_sim:
                        best, best_sim = b, sim
                scores.append((best_sim, rank, a, best))
            # highest similarity first; ties to the lower rank
            scores.sort(key=lambda t: (-t[0], t[1]))
            received: dict[int, list[int]] = {}
            for _, _, a, b in scores[:r]:
                keep[a] = False
                destination[a] = b
                received.setdefault(b, []).append(a)
            for b, group in received.items():
                total = weights[b] + sum(weights[a] for a in group)
                if total > 0:
                    acc = weights[b] * hidden[b].double()
                    for a in group:
                        acc = acc + weights[a] * hidden[a].double()
                    new_hidden[b] = (acc / total).to(hidden.dtype)
                else:
                    acc = hidden[b].double()
                    for a in group:
                        acc = acc + hidden[a].double()
                    new_hidden[b] = (acc / (1 + len(group))).to(hidden.dtype)
    return (keep, new_hidden, destination) if with_destination else (keep, new_hidden)


def reference_faithful(q, k, prompt, valid, scaling):
    """Full N x N logits, then softmax over queries for each prompt key. q (H, N, Dh), k (H, N, Dh)."""
    logits = torch.einsum("hid,hjd->hij", q.double(), k.double()) * scaling  # (H, N, N)
    logits[:, ~valid, :] = -math.inf
    probs = torch.softmax(logits, dim=1)  # over queries i
    return probs[:, :, prompt].sum(dim=(0, 2))


def reference_text_to_vision(q, k, text, valid, scaling):
    """Full causal attention, then the attention that text queries pay to each key."""
    N = q.shape[1]
    logits = torch.einsum("hid,hjd->hij", q.double(), k.double()) * scaling
    causal = torch.tril(torch.ones(N, N, dtype=torch.bool)) & valid[None, :]
    logits = logits.masked_fill(~causal[None], -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return probs[:, text, :].sum(dim=(0, 1))
