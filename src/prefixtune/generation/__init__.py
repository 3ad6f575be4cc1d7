"""Decoding with prefixes on token ids only: prefill, cached steps, sampling, beam search,
packing, the KV cache and continuous batching. No text, no data, no methods."""
