"""Batched next-token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds. Runs on the
logits' device; the only host transfer is the caller reading the sampled ids (and, for requests that ask
for them, their log-probabilities)."""

from __future__ import annotations

import torch


def sample_torch(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                 generators: list[torch.Generator | None], min_p: list[float] | None = None) -> torch.Tensor:
    """tokens[i] = argmax(logits[i]) if temperature[i] == 0 else a draw from softmax(logits[i] / T)
    restricted to the top_k[i] (0 = all) most likely tokens, the smallest set of mass >= top_p[i], and the
    tokens at least min_p[i] (0 = all; None: 0 for every row) times as likely as the most likely one.

    logits: [N, V] fp32; returns [N] int64. A row with a generator draws its noise from it alone, so a
    seeded request samples the same tokens whatever else is in the batch. Nothing here waits for the
    device: per-row parameters travel in one asynchronous copy from pinned memory.
    """
    greedy = logits.argmax(-1)
    if all(t == 0 for t in temperature):
        return greedy
    n, vocab = logits.shape
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    min_p = min_p or [0.0] * n
    rows = to_device([[t if t > 0 else 1.0 for t in temperature], top_p, ks, [float(t == 0) for t in temperature],
                      min_p], logits.device)
    temp, p, k, is_greedy, least = rows
    x = logits / temp[:, None]
    if any(q > 0 for q in min_p):  # p_j >= min_p * p_max <=> x_j - x_max >= log(min_p); invariant under the
        # renormalizing masks below, so their order does not matter
        x = x.masked_fill(x - x.max(-1, keepdim=True).values < least.log()[:, None], float("-inf"))
    if any(k < vocab for k in ks):
        x = _mask_top_k(x, k.long())
    if any(q < 1.0 for q in top_p):
        x = _mask_top_p(x, p)
    probs = x.softmax(-1)
    noise = torch.empty_like(probs).exponential_()  # one launch for the unseeded rows
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i].exponential_(generator=gen)
    sampled = (probs / noise).argmax(-1)  # exponential race: an exact draw from `probs`
    return torch.where(is_greedy.bool(), greedy, sampled)


def add_logit_bias(logits: torch.Tensor, biases: list[tuple[tuple[int, float], ...] | None]) -> torch.Tensor:
    """logits [N, V] plus, in row i, each (token id, bias) of biases[i] (None: none); a new tensor. The
    entries travel in one asynchronous copy from pinned memory."""
    entries = [(row, token, bias) for row, pairs in enumerate(biases) for token, bias in pairs or ()]
    flat = to_device([v for e in entries for v in e], logits.device, torch.float64).view(-1, 3)
    return logits.index_put((flat[:, 0].long(), flat[:, 1].long()), flat[:, 2].to(logits.dtype), accumulate=True)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor, presence: list[float],
                    frequency: list[float], repetition: list[float]) -> torch.Tensor:
    """Penalized logits [N, V], a new tensor. Row i's logits of the tokens seen so far (generated, counts[i] > 0,
    or in the prompt, in_prompt[i]) are first divided by repetition[i] where positive and multiplied by it
    where negative (the CTRL paper's penalty, as in transformers and vLLM; 1 = none); then OpenAI's penalties
    subtract frequency[i] x counts[i] (how often each token was generated) and presence[i] where counts[i] > 0."""
    pres, freq, rep = to_device([presence, frequency, repetition], logits.device).to(logits.dtype)
    if any(r != 1.0 for r in repetition):
        seen = (counts > 0) | in_prompt
        rep = torch.where(seen, rep[:, None], 1.0)
        logits = torch.where(logits > 0, logits / rep, logits * rep)
    return logits - counts * freq[:, None] - (counts > 0).to(logits.dtype) * pres[:, None]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits [N, V] and the tokens sampled from them [N]: (each token's logprob [N], the `top` largest
    logprobs of each row [N, top], their token ids [N, top]) under the model's distribution, log_softmax of
    the logits: before temperature, top-k and top-p, which only shape the draw. fp32, on the logits' device."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    values, ids = logp.topk(top, dim=-1)
    return chosen, values, ids


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device`; from pinned memory without a host sync on CUDA (a plain
    torch.tensor(..., device="cuda") waits for the stream, here for the whole step in flight)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _mask_top_k(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    kth = x.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None])
    return x.masked_fill(x < kth, float("-inf"))


def _mask_top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_x, order = x.sort(-1, descending=True)
    probs = sorted_x.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p[:, None]  # keep tokens until the mass before them reaches p
    return x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
