"""Paged KV cache: the block manager (pure Python bookkeeping) and the pool tensor."""
