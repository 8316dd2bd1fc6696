"""Batched next-token sampling: greedy, temperature, top-k, top-p, per-request seeds. Runs on the
logits' device; the only host transfer is the caller reading the sampled ids."""

from __future__ import annotations

import torch


def sample_torch(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                 generators: list[torch.Generator | None]) -> torch.Tensor:
    """tokens[i] = argmax(logits[i]) if temperature[i] == 0 else a draw from softmax(logits[i] / T)
    restricted to the top_k[i] (0 = all) most likely tokens and the smallest set of mass >= top_p[i].

    logits: [N, V] fp32; returns [N] int64. A row with a generator draws its noise from it alone, so a
    seeded request samples the same tokens whatever else is in the batch.
    """
    greedy = logits.argmax(-1)
    if all(t == 0 for t in temperature):
        return greedy
    device = logits.device
    temp = torch.tensor([t if t > 0 else 1.0 for t in temperature], device=device)
    x = logits / temp[:, None]
    if any(0 < k < x.shape[-1] for k in top_k):
        x = _mask_top_k(x, top_k)
    if any(p < 1.0 for p in top_p):
        x = _mask_top_p(x, torch.tensor(top_p, device=device))
    probs = x.softmax(-1)
    noise = torch.empty_like(probs)
    for i, gen in enumerate(generators):
        noise[i].exponential_(generator=gen)
    sampled = (probs / noise).argmax(-1)  # exponential race: an exact draw from `probs`
    is_greedy = torch.tensor([t == 0 for t in temperature], device=device)
    return torch.where(is_greedy, greedy, sampled)


def _mask_top_k(x: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    k = torch.tensor([k if 0 < k < x.shape[-1] else x.shape[-1] for k in top_k], device=x.device)
    kth = x.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None])
    return x.masked_fill(x < kth, float("-inf"))


def _mask_top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_x, order = x.sort(-1, descending=True)
    probs = sorted_x.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p[:, None]  # keep tokens until the mass before them reaches p
    return x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
