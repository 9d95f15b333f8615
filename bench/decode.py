"""Decode speed: qwen15's generate against transformers' generate, same random weights, same process.

    python bench/decode.py                                  # qwen1.5-0.5b shape, batch 1 and 8, fp32 and bf16
    python bench/decode.py --preset qwen1.5-7b --device cuda --dtype bf16 --batch 1
    python bench/decode.py --int8                           # adds our int8 weight-only rows
    python bench/decode.py --hf-static                      # adds transformers' static cache + compile baseline

Two baselines: transformers' default `generate` (eager, dynamic cache), and with `--hf-static` its fastest
documented path: `generate(cache_implementation="static", compile_config=CompileConfig())`, which keeps the prefill
eager and compiles the decode step (mode reduce-overhead: CUDA graphs on a GPU; on CPU `_compile_all_devices` makes
it compile too). Each ratio is printed against both; when the static path fails, the row says why (exception
type and message) instead of a figure.

Both models share one set of weight tensors (transformers' Qwen2ForCausalLM holds them; ours points at the same
storage), so the comparison costs one model's memory. Each configuration runs the two engines alternately,
`--repeat` times, and keeps the best times of each (on a shared machine the fastest run is the one least
disturbed by other work; both engines get the same number of tries). Decode tokens/s = batch * (new_tokens - 1)
/ (best time of a full generate - best time of a one-token generate), i.e. prefill excluded for both. "same greedy
tokens": the share of positions where our greedy tokens equal transformers' (100% expected in fp32; bf16
kernels may round differently, and one different token changes the rest of the row). Roofline: the weight bytes
one decode step must read (every matrix once, the embedding row lookup aside) over the memory bandwidth
measured here, in this run, by a large tensor copy (bytes read plus written over time, as ANCHORS.md quotes
it). On CPU our bf16 rows prepack the weights for oneDNN (`--no-pack` to compare without).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def hf_config_dict(cfg) -> dict:
    """Our ModelConfig as the config.json that save_pretrained writes (the shape transformers gets)."""
    d = cfg.to_hf_dict()
    d.pop("torch_dtype", None)  # the bench casts the model itself
    return d


def hf_model(cfg, dtype, device):
    """transformers' model in `dtype` with its rotary inv_freq kept fp32, as from_pretrained of a bf16
    checkpoint leaves it (a bare `.to(bf16)` also rounds inv_freq, a drift of our setup, not of the kernels)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hc = Qwen2Config(**hf_config_dict(cfg), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(hc)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    model = model.to(dtype)
    model.model.rotary_emb.inv_freq = inv_freq
    if hasattr(model.model.rotary_emb, "original_inv_freq"):
        model.model.rotary_emb.original_inv_freq = inv_freq
    return model.eval()


def ours_sharing(hf, cfg):
    """Our model whose parameters are the transformers model's tensors (no copy)."""
    from qwen15 import Qwen
    from qwen15.hf_folder import our_name

    with torch.device("meta"):
        ours = Qwen(cfg)
    state = {our_name(k): v for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    ours.load_state_dict(state, strict=True, assign=True)
    ours.tie_weights()
    return ours.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_bandwidth(device) -> float:
    """Bytes/s moved by a large tensor copy, reads plus writes (as ANCHORS.md quotes it)."""
    n = 256 * 2**20 if device.type == "cpu" else 2 * 2**30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    a.fill_(1)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * n / best


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: the blocks, the final norm and the output layer, each tensor once
    (the embedding table is read one row per token, unless it is the output layer too)."""
    seen, total = set(), 0
    for module in (model.layers, model.norm, model.lm_head):
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def generate_times(run, n: int, device) -> tuple[float, float]:
    """Seconds of a generate of n tokens and of a single token (the prefill and first pick)."""
    times = []
    for k in (n, 1):
        sync(device)
        t = time.perf_counter()
        run(k)
        sync(device)
        times.append(time.perf_counter() - t)
    return times[0], times[1]


def decode_seconds(samples: list[tuple[float, float]]) -> float:
    """Time of n - 1 decode steps: the best full generate minus the best one-token generate (taking each best
    separately keeps one disturbed short run from making the difference meaningless)."""
    return min(f for f, _ in samples) - min(p for _, p in samples)


def hf_static_generate(hf, device):
    """transformers' static-cache + compiled-decode `generate` (see the module docstring) as run(prompt, k)."""
    from transformers import CompileConfig

    compile_config = CompileConfig()  # transformers' defaults: inductor, mode reduce-overhead
    if device.type != "cuda":
        compile_config._compile_all_devices = True  # compile on CPU too (transformers' own switch)

    def run(prompt, k):
        ids = prompt.to(device)
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
                cache_implementation="static",
                compile_config=compile_config,
            )
        return out[:, ids.shape[1] :].tolist()

    return run


def failure(e: BaseException) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen1.5-0.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--int8", action="store_true", help="add our int8 weight-only rows (against the same reference)"
    )
    p.add_argument(
        "--no-reference", action="store_true", help="skip transformers (e.g. 7B compiled on GPU only)"
    )
    p.add_argument(
        "--hf-static",
        action="store_true",
        help="also time transformers' static cache + compiled decode (its fastest documented path)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-pack", action="store_true", help="do not prepack bf16 weights for oneDNN on CPU")
    args = p.parse_args(argv)

    import transformers

    from qwen15.generation import Generator
    from qwen15.model_config import get_preset
    from qwen15.sampling import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = get_preset(args.preset)
    bw = memory_bandwidth(device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# decode bench: {args.preset}, {machine}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; prompt {args.prompt_len}, {args.new_tokens} new tokens, best of "
        f"{args.repeat}; memory bandwidth (copy, read + write) {bw / 1e9:.1f} GB/s",
        flush=True,
    )
    static_cols = " transformers static+compile tok/s | ratio vs static+compile | same tokens as static |"
    print(
        "| weights | batch | transformers eager tok/s | qwen15 tok/s | ratio vs eager | qwen15 share of roofline "
        "| same greedy tokens |" + (static_cols if args.hf_static else "")
    )
    print("| --- " * (10 if args.hf_static else 7) + "|", flush=True)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = [(d, b, False) for d in args.dtype for b in args.batch]
    if args.int8:
        rows += [("bf16", b, True) for b in args.batch]
    current, hf, ours = None, None, None
    for dname, batch, int8 in rows:
        dtype = dtypes[dname]
        if current != (dname, int8):
            hf = ours = None
            hf = hf_model(cfg, dtype, device)
            if args.no_pack and not int8:
                from qwen15.fuse import fuse_projections

                ours = fuse_projections(ours_sharing(hf, cfg))
            else:
                from qwen15.prepare import prepare_for_inference

                ours = prepare_for_inference(ours_sharing(hf, cfg), "int8" if int8 else None)  # as the CLI
            current = (dname, int8)
        gen = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, 151000, (batch, args.prompt_len), generator=gen)
        engine = Generator(ours, None)
        greedy = SamplingParams()
        n = args.new_tokens

        def run_ours(k, engine=engine, prompt=prompt, greedy=greedy):
            outs = engine.generate(prompt.tolist(), max_new_tokens=k, sampling=greedy, stop_token_ids=[])
            return [o.token_ids for o in outs]

        def run_hf(k, prompt=prompt, hf=hf):
            ids = prompt.to(device)
            with torch.inference_mode():
                out = hf.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=k,
                    min_new_tokens=k,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )
            return out[:, ids.shape[1] :].tolist()

        ours_tokens = run_ours(n)  # also the warm-up (and the compile, on GPU)
        same = "-"
        if not args.no_reference:
            ref_tokens = run_hf(n)
            agree = sum(a == b for r, o in zip(ref_tokens, ours_tokens) for a, b in zip(r, o))
            same = f"{agree / (batch * n):.0%}"
        run_static, static_error, static_same = None, None, "-"
        if args.hf_static:
            try:
                static = hf_static_generate(hf, device)
                static_tokens = static(prompt, n)  # compiles the decode step for this shape
                static(prompt, 1)  # and for the one-token generate the timing subtracts
                agree = sum(a == b for r, o in zip(static_tokens, ours_tokens) for a, b in zip(r, o))
                static_same = f"{agree / (batch * n):.0%}"
                run_static = lambda k, static=static, prompt=prompt: static(prompt, k)  # noqa: E731
            except Exception as e:  # recorded in the row: why transformers' best path did not run here
                static_error = failure(e)
                print(f"transformers static+compile {dname} batch {batch}: {static_error}", file=sys.stderr)
        ours_t, hf_t, static_t = [], [], []
        for _ in range(args.repeat):
            ours_t.append(generate_times(run_ours, n, device))
            if not args.no_reference:
                hf_t.append(generate_times(run_hf, n, device))
            if run_static is not None:
                try:
                    static_t.append(generate_times(run_static, n, device))
                except Exception as e:
                    static_error, run_static = failure(e), None
        tokens = batch * (n - 1)
        ours_rate = tokens / decode_seconds(ours_t)
        hf_rate = tokens / decode_seconds(hf_t) if hf_t else float("nan")
        roofline = bw / weight_bytes_per_step(ours) * batch
        label = "int8 weights, bf16 act." if int8 else dname
        vs = " (vs transformers bf16)" if int8 else ""
        row = (
            f"| {label} | {batch} | {hf_rate:.1f} | {ours_rate:.1f} | {ours_rate / hf_rate:.2f}x{vs} | "
            f"{ours_rate / roofline:.0%} of {roofline:.0f} | {same} |"
        )
        if args.hf_static:
            if static_error is not None or not static_t:
                row += f" {static_error or 'failed'} | - | - |"
            else:
                static_rate = tokens / decode_seconds(static_t)
                row += f" {static_rate:.1f} | {ours_rate / static_rate:.2f}x{vs} | {static_same} |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
