"""Adapter-popularity patterns and request-length distributions shared by tests, benchmarks and the demo.

Popularity (from the Punica paper): which adapter each of n requests uses, out of `num_adapters`.
  distinct  every request its own adapter
  identical all requests one adapter
  uniform   adapters drawn uniformly at random
  zipf:A    adapter i drawn with probability proportional to 1 / (i+1)**A  ("skewed" is zipf:1.5)
  skewed    zipf:1.5
A pattern that once exposed a bug is added here so every test and benchmark sweeps it.
"""

from __future__ import annotations

import random

POPULARITIES = ("distinct", "uniform", "zipf:1.5", "identical", "skewed")


def adapter_indices(popularity: str, n: int, num_adapters: int | None = None, seed: int = 0) -> list[int]:
    """The adapter index (0-based) of each of `n` requests under `popularity`."""
    rng = random.Random(seed)
    num_adapters = n if num_adapters is None else num_adapters
    if popularity == "distinct":
        return [i % num_adapters for i in range(n)]
    if popularity == "identical":
        return [0] * n
    if popularity == "uniform":
        return [rng.randrange(num_adapters) for _ in range(n)]
    if popularity == "skewed":
        popularity = "zipf:1.5"
    if popularity.startswith("zipf:"):
        alpha = float(popularity.split(":", 1)[1])
        weights = [1.0 / (i + 1) ** alpha for i in range(num_adapters)]
        return rng.choices(range(num_adapters), weights=weights, k=n)
    raise ValueError(f"unknown popularity {popularity!r}; choose from {POPULARITIES}")


def sharegpt_like_lengths(n: int, seed: int = 0, max_prompt: int = 1024, max_output: int = 512
                          ) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs from a log-normal fit of ShareGPT conversations.

    ShareGPT's prompt lengths have a median near 150 tokens with a long tail, outputs a median near 200;
    we draw log-normal(mu=ln 150, sigma=0.9) prompts and log-normal(mu=ln 200, sigma=0.8) outputs,
    clipped to [4, max_prompt] and [4, max_output].
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        p = int(min(max(rng.lognormvariate(5.01, 0.9), 4), max_prompt))
        o = int(min(max(rng.lognormvariate(5.30, 0.8), 4), max_output))
        pairs.append((p, o))
    return pairs
