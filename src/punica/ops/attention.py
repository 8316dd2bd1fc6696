"""Paged attention over the KV pool, for prefill chunks and decodes in one call.

Sequence b has query tokens q[cu_q[b]:cu_q[b+1]] that are the *last* q_len(b) of its kv_len(b) tokens
(their K/V are already stored); its K/V live in blocks block_tables[b, 0..ceil(kv_len/block_size)).
Query j of sequence b (absolute position kv_len - q_len + j) attends causally to positions <= its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMeta:
    """Per-step attention metadata (a field of the model's Batch).

    cu_q:         [B+1] int32 query offsets
    kv_lens:      [B] int32 tokens of context per sequence, including this step's
    block_tables: [B, max_blocks] int32 block ids (unused tail entries are 0)
    max_q_len / max_kv_len: host ints (grid bounds); host_cu_q / host_kv_lens: the same as lists
    """

    cu_q: torch.Tensor
    kv_lens: torch.Tensor
    block_tables: torch.Tensor
    max_q_len: int
    max_kv_len: int
    host_cu_q: list[int]
    host_kv_lens: list[int]

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMeta, scale: float) -> torch.Tensor:
    """out[t] = softmax(q[t] @ K[:p(t)+1].T * scale) @ V[:p(t)+1] per head, GQA heads sharing K/V.

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; returns [T, Hq, D] in q.dtype.
    """
    num_blocks, block_size, h_kv, d = k_cache.shape
    group = q.shape[1] // h_kv
    out = torch.empty_like(q)
    for b, kv_len in enumerate(meta.host_kv_lens):
        q0, q1 = meta.host_cu_q[b], meta.host_cu_q[b + 1]
        if q1 == q0:
            continue
        n_blk = -(-kv_len // block_size)
        blocks = meta.block_tables[b, :n_blk].long()
        k = k_cache[blocks].reshape(-1, h_kv, d)[:kv_len].float()
        v = v_cache[blocks].reshape(-1, h_kv, d)[:kv_len].float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, kv, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[q0:q1].float().transpose(0, 1)  # [Hq, n, D]
        scores = (qb @ k.transpose(1, 2)) * scale
        q_pos = torch.arange(kv_len - (q1 - q0), kv_len, device=q.device)[:, None]
        mask = torch.arange(kv_len, device=q.device)[None, :] > q_pos
        scores.masked_fill_(mask, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out
