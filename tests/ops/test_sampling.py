"""Batched sampling: greedy rows, temperature draws that follow softmax(logits / T), top-k, top-p and min-p
masks, seeded rows independent of the rest of the batch, and penalties (repetition's against transformers')."""

from __future__ import annotations

import torch

from punica.ops.sampling import add_logit_bias, apply_penalties, sample_torch, token_logprobs


def draws(logits_row: torch.Tensor, n: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    logits = logits_row.expand(n, -1).contiguous()
    return sample_torch(logits, [temperature] * n, [top_k] * n, [top_p] * n, [None] * n, [min_p] * n)


def test_draws_follow_the_tempered_softmax():
    torch.manual_seed(0)
    row = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    for temperature in (1.0, 0.5, 2.0):
        counts = torch.bincount(draws(row, 40000, temperature), minlength=5).float() / 40000
        expected = (row / temperature).softmax(-1)
        assert (counts - expected).abs().max() < 0.012, (temperature, counts, expected)


def test_top_k_and_top_p_keep_only_their_tokens():
    torch.manual_seed(1)
    row = torch.tensor([3.0, 2.9, 2.8, 0.0, -1.0, -2.0])
    assert set(draws(row, 5000, top_k=2).tolist()) == {0, 1}
    probs = row.softmax(-1)  # top_p 0.5: token 0 alone has 0.36 < 0.5, with token 1 0.68 >= 0.5
    assert probs[0] < 0.5 < probs[0] + probs[1]
    assert set(draws(row, 5000, top_p=0.5).tolist()) == {0, 1}
    assert set(draws(row, 5000, top_k=1).tolist()) == {0}


def test_greedy_rows_and_seeded_rows_in_a_mixed_batch():
    torch.manual_seed(2)
    logits = torch.randn(6, 50)
    temps = [0.0, 1.0, 0.0, 0.8, 1.0, 1.2]
    gens = [None, torch.Generator().manual_seed(7), None, None, torch.Generator().manual_seed(8), None]
    out = sample_torch(logits, temps, [0] * 6, [0.9] * 6, gens)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    alone = sample_torch(logits[1:2], [1.0], [0], [0.9], [torch.Generator().manual_seed(7)])
    assert out[1] == alone[0]  # a seeded row does not depend on what else is in the batch
    alone = sample_torch(logits[4:5], [1.0], [0], [0.9], [torch.Generator().manual_seed(8)])
    assert out[4] == alone[0]


def test_logit_bias_shifts_only_its_rows_and_tokens_and_draws_follow_it():
    torch.manual_seed(2)
    logits = torch.randn(3, 6)
    biased = add_logit_bias(logits, [((1, 2.0), (4, -1.5)), None, ((0, 100.0),)])
    expected = logits.clone()
    expected[0, 1] += 2.0
    expected[0, 4] -= 1.5
    expected[2, 0] += 100.0
    assert torch.equal(biased, expected) and not torch.equal(biased, logits)  # a new tensor, the input untouched
    row = torch.tensor([1.0, 0.5, 0.0])
    counts = torch.bincount(draws(add_logit_bias(row[None], [((2, 1.0),)])[0], 40000), minlength=3).float() / 40000
    assert (counts - torch.tensor([1.0, 0.5, 1.0]).softmax(-1)).abs().max() < 0.012


def test_token_logprobs_are_the_log_softmax_and_its_top():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 2.0]])
    chosen, values, ids = token_logprobs(logits, torch.tensor([2, 1]), 2)
    logp = logits.log_softmax(-1)
    assert torch.allclose(chosen, torch.stack([logp[0, 2], logp[1, 1]]))
    assert ids.tolist() == [[0, 1], [1, 3]] and torch.allclose(values, logp.gather(1, ids))
    assert token_logprobs(logits, torch.tensor([0, 0]), 0)[1].shape == (2, 0)


def test_penalties_subtract_frequency_times_count_and_presence_once():
    logits = torch.zeros(2, 5)
    counts = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0], [0.0] * 5])
    out = apply_penalties(logits, counts, torch.zeros(2, 5, dtype=torch.bool), [0.5, 0.0], [1.0, 0.0], [1.0, 1.0])
    assert out[0].tolist() == [0.0, -2.5, 0.0, -1.5, -1.5] and out[1].tolist() == [0.0] * 5
    assert torch.equal(logits, torch.zeros(2, 5))  # a new tensor


def test_repetition_penalty_equals_transformers_over_prompt_and_generated_tokens():
    """transformers' RepetitionPenaltyLogitsProcessor over the prompt + generated ids is the reference; rows
    with penalty 1 are untouched, and presence/frequency still apply on top (generated tokens only)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(3, vocab) * 3
    prompt = [[1, 4, 4, 9, 30], [2, 3], [7]]
    generated = [[9, 11, 11], [40], []]
    counts = torch.zeros(3, vocab)
    in_prompt = torch.zeros(3, vocab, dtype=torch.bool)
    for i in range(3):
        counts[i] += torch.bincount(torch.tensor(generated[i], dtype=torch.long), minlength=vocab).float()
        in_prompt[i, prompt[i]] = True
    penalties = [1.3, 0.7, 1.0]
    out = apply_penalties(logits, counts, in_prompt, [0.0] * 3, [0.0] * 3, penalties)
    for i, penalty in enumerate(penalties):
        ids = torch.tensor([prompt[i] + generated[i]])
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i:i + 1].clone())
        assert torch.allclose(out[i], ref[0]), i
    assert torch.equal(out[2], logits[2]) and not torch.equal(out[0], logits[0])
    both = apply_penalties(logits, counts, in_prompt, [0.5] * 3, [1.0] * 3, penalties)
    assert torch.allclose(both, out - counts - 0.5 * (counts > 0).float())


def test_min_p_keeps_the_tokens_transformers_keeps():
    """Draws stay within transformers' MinPLogitsWarper's set (after temperature), and min_p 0 keeps all."""
    from transformers.generation.logits_process import MinPLogitsWarper
    torch.manual_seed(1)
    row = torch.tensor([3.0, 2.5, 1.0, 0.0, -2.0, 2.9])
    for min_p, temperature in ((0.3, 1.0), (0.1, 2.0), (0.6, 0.5)):
        kept = MinPLogitsWarper(min_p)(None, (row / temperature)[None].clone())[0] > float("-inf")
        seen = set(draws(row, 4000, temperature, min_p=min_p).tolist())
        assert seen == set(kept.nonzero().flatten().tolist()), (min_p, temperature, seen)
    assert set(draws(row, 4000, 2.0).tolist()) == set(range(6))
