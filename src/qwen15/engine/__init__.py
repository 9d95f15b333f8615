"""The continuous-batching engine: token ids in, token ids out; no text inside.

kv_slots.py   the KV cache: one slot (a row of positions) per running sequence, and prefix reuse between slots
scheduler.py  sequences, the bounded waiting queue, admission into free slots and the chunked-prefill plan
sampler.py    per-sequence sampling settings and seeds within one batched step
decode_step.py  the batched decode forward: eager, or static shapes per batch bucket (CUDA graphs on GPU)
engine.py     Engine.step(): admit, decode every running sequence, prefill the next chunk, retire

`qwen15.generation` (generate, stream_generate, chat) and `qwen15.serve` (the HTTP server) drive it; text
(detokenization, stop strings, streaming deltas) is their business (qwen15.output_text).
"""
