"""Decode speed: qwen15's generate against transformers' generate (and llama.cpp), same random weights, one run.

    python bench/decode.py                                  # qwen1.5-0.5b shape, batch 1 and 8, fp32 and bf16
    python bench/decode.py --preset qwen1.5-7b --device cuda --dtype bf16 --batch 1
    python bench/decode.py --dtype bf16 --int8 --int4 --llamacpp --prefill 512   # the CPU comparison of RESULTS.md
    python bench/decode.py --readme-path                    # adds the README's Python path beside the CLI's
    python bench/decode.py --hf-static                      # adds transformers' static cache + compile baseline

Both models share one set of weight tensors (transformers' Qwen2ForCausalLM holds them; ours points at the same
storage, then is prepared as the CLI prepares it: fused projections, then int8/int4 or oneDNN prepacking on CPU).
Each configuration runs the engines alternately, `--repeat` rounds, and reports the median of the rounds. Decode
tokens/s = batch * (new_tokens - 1) / (time of a full generate - time of a one-token generate), i.e. prefill
excluded for both. "same greedy tokens": the share of positions where our greedy tokens equal transformers' (100%
expected in fp32; bf16 kernels may round differently, and one different token changes the rest of the row).

--llamacpp adds llama.cpp (bench/llamacpp.py: built once from the sources vendored in PyPI's llama-cpp-python, into
a cache folder): the same random weights saved as a Hugging Face folder, converted to GGUF BF16 / Q8_0 by its
convert_hf_to_gguf.py and to Q4_0 by its llama-quantize, timed by llama-bench with the same threads (`-n NEW` for
decode, `-p PREFILL` for prefill), one llama-bench call per round between ours and transformers'. Its decode starts
from an empty context, ours after the prompt: at these lengths attention is a few percent of a step.

--readme-path adds the path the README shows: the same weights saved to a folder, `Qwen.from_pretrained(folder,
dtype=...)` + `prepare_for_inference(model, quantize)` + `qwen15.generate(model, None, ids, ...)`, timed in the same
rounds; it should be within noise of the qwen15 column (which runs the CLI's engine on the CLI's preparation).

--hf-static adds transformers' fastest documented path: `generate(cache_implementation="static",
compile_config=CompileConfig())`, which keeps the prefill eager and compiles the decode step (mode reduce-overhead:
CUDA graphs on a GPU; on CPU `_compile_all_devices` makes it compile too). When it fails, the row says why
(exception type and message) instead of a figure.

Roofline: the weight bytes one decode step must read (every matrix once, the embedding row lookup aside; for
llama.cpp the GGUF file, whose tied token table is its output matrix) over the memory bandwidth measured here, in
this run, by a large tensor copy (bytes read plus written over time, as ANCHORS.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_TYPE = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
LLAMA_LABEL = {"bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


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


def prepare(ours, weights: str, pack: bool):
    """As the CLI prepares a model (qwen15.prepare_for_inference: fused projections, then int8/int4, or oneDNN
    prepacking of bf16/fp32 on CPU); --no-pack: fused only."""
    from qwen15.fuse import fuse_projections
    from qwen15.prepare import prepare_for_inference

    if weights in ("int8", "int4") or pack:
        return prepare_for_inference(ours, weights if weights in ("int8", "int4") else None)
    return fuse_projections(ours)


def readme_path(ours_unprepared, weights: str, dtype, device, folder: Path):
    """The README's Python path on the same weights: save, Qwen.from_pretrained, prepare_for_inference, and
    qwen15.generate as run(prompt, k)."""
    from qwen15 import Qwen, generate, prepare_for_inference

    path = folder / str(dtype).removeprefix(
        "torch."
    )  # bf16, int8 and int4 rows start from the same bf16 folder
    if not path.exists():
        ours_unprepared.save_pretrained(str(path))
    model = Qwen.from_pretrained(str(path), dtype=dtype, device=device)
    prepare_for_inference(model, weights if weights in ("int8", "int4") else None)

    def run(prompt, k):
        outs = generate(model, None, prompt.tolist(), max_new_tokens=k, temperature=0, stop_token_ids=[])
        return [o.token_ids for o in outs]

    return run


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
            key = id(t) if t.is_mkldnn else (t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def timed(run, k: int, device) -> float:
    sync(device)
    t = time.perf_counter()
    run(k)
    sync(device)
    return time.perf_counter() - t


def median_rate(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


class LlamaCpp:
    """llama.cpp on the bench's own random weights: GGUF files made once per preset in the cache folder."""

    def __init__(self, cfg, preset: str, tokenizer_dir: Path, threads: int):
        import transformers

        sys.path.insert(0, str(Path(__file__).parent))
        import llamacpp

        self.mod = llamacpp
        self.threads = threads
        llamacpp.build()
        self.work = llamacpp.cache_dir() / "models" / f"{preset}-seed0-transformers{transformers.__version__}"
        hf_dir = self.work / "hf"
        if not (hf_dir / "config.json").exists():
            if not (tokenizer_dir / "vocab.json").is_file():
                raise SystemExit(
                    f"--llamacpp: no tokenizer in {tokenizer_dir} (convert_hf_to_gguf needs one); --tokenizer DIR"
                )
            self.work.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.work))
            hf_model(cfg, torch.bfloat16, "cpu").save_pretrained(
                tmp
            )  # the weights of the bf16/int8/int4 rows
            for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
                if (tokenizer_dir / name).is_file():
                    (tmp / name).write_bytes((tokenizer_dir / name).read_bytes())
            os.replace(tmp, hf_dir)
        self.hf_dir = hf_dir

    def gguf(self, kind: str) -> Path:
        return self.mod.convert(self.hf_dir, kind, self.work)

    def rates(self, kind: str, prompt_len: int, new_tokens: int) -> dict:
        return self.mod.bench(self.gguf(kind), self.threads, prompt_len, new_tokens, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen1.5-0.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="rounds per configuration (median reported)")
    p.add_argument("--int8", action="store_true", help="add our int8 weight-only rows (bf16 activations)")
    p.add_argument("--int4", action="store_true", help="add our int4 weight-only rows (bf16 activations)")
    p.add_argument(
        "--llamacpp",
        action="store_true",
        help="add llama.cpp (BF16, Q8_0, Q4_0) at batch 1 (bench/llamacpp.py)",
    )
    p.add_argument(
        "--prefill",
        type=int,
        default=0,
        metavar="N",
        help="also time a prompt of N tokens, batch 1 (0: skip)",
    )
    p.add_argument(
        "--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/tokenizer/qwen1.5")
    )
    p.add_argument(
        "--no-reference", action="store_true", help="skip transformers (e.g. 7B compiled on GPU only)"
    )
    p.add_argument(
        "--readme-path",
        action="store_true",
        help="also time the README's Python path (from_pretrained + prepare_for_inference + generate)",
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
    from qwen15.quantize import describe
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
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(
        f"# decode bench: {args.preset}, {machine}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; prompt {args.prompt_len}, {args.new_tokens} new tokens, median of "
        f"{args.repeat} rounds; memory bandwidth (copy, read + write) {bw / 1e9:.1f} GB/s{load}",
        flush=True,
    )
    rows = [(d, b) for d in args.dtype for b in args.batch]
    rows += [(w, b) for w, on in (("int8", args.int8), ("int4", args.int4)) if on for b in args.batch]
    llama = None
    header = "| weights | batch | transformers tok/s | qwen15 tok/s | vs transformers |"
    if args.readme_path:
        header += " qwen15 README path tok/s | README path vs CLI path |"
    if args.hf_static:
        header += " transformers static+compile tok/s | vs static+compile | same tokens as static |"
    if args.llamacpp:
        header += " llama.cpp tok/s | vs llama.cpp | llama.cpp share of roofline |"
    header += " qwen15 share of roofline | same greedy tokens | qwen15 format |"
    lines = [header, "|" + " --- |" * header.count(" |")]
    print(*lines, sep="\n", flush=True)
    prefill_lines = []
    current, hf, ours = None, None, None
    greedy = SamplingParams()
    saved = Path(tempfile.mkdtemp(prefix="qwen15-decode-bench.")) if args.readme_path else None
    readme = None
    for weights, batch in rows:
        dtype = torch.float32 if weights == "fp32" else torch.bfloat16
        if current != weights:
            hf = ours = readme = None
            hf = hf_model(cfg, dtype, device)
            if args.llamacpp and llama is None:
                llama = LlamaCpp(cfg, args.preset, Path(args.tokenizer), torch.get_num_threads())
            if saved is not None:
                readme = readme_path(ours_sharing(hf, cfg), weights, dtype, device, saved)
            ours = prepare(ours_sharing(hf, cfg), weights, not args.no_pack)
            current = weights
        gen = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, 151000, (batch, args.prompt_len), generator=gen)
        engine = Generator(ours, None)
        n = args.new_tokens

        def run_ours(k, engine=engine, prompt=prompt):
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
        run_readme = None
        if readme is not None:
            run_readme = lambda k, prompt=prompt, readme=readme: readme(prompt, k)  # noqa: E731
            run_readme(n)  # warm-up
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
                print(f"transformers static+compile {weights} batch {batch}: {static_error}", file=sys.stderr)
        kind = LLAMA_TYPE.get(weights) if llama is not None and batch == 1 else None
        tokens = batch * (n - 1)
        ours_r, hf_r, ll_r, readme_r, static_r = [], [], [], [], []
        for _ in range(args.repeat):
            ours_r.append(tokens / (timed(run_ours, n, device) - timed(run_ours, 1, device)))
            if run_readme is not None:
                readme_r.append(tokens / (timed(run_readme, n, device) - timed(run_readme, 1, device)))
            if not args.no_reference:
                hf_r.append(tokens / (timed(run_hf, n, device) - timed(run_hf, 1, device)))
            if run_static is not None:
                try:
                    static_r.append(tokens / (timed(run_static, n, device) - timed(run_static, 1, device)))
                except Exception as e:
                    static_error, run_static = failure(e), None
            if kind:
                ll_r.append(llama.rates(kind, 0, n)["decode"])
        ours_rate, hf_rate = median_rate(ours_r), median_rate(hf_r)
        roofline = bw / weight_bytes_per_step(ours) * batch
        label = f"{weights} weights, bf16 act." if weights in ("int8", "int4") else weights
        vs = " (vs transformers bf16)" if weights in ("int8", "int4") else ""
        cells = [label, str(batch), f"{hf_rate:.1f}", f"{ours_rate:.1f}", f"{ours_rate / hf_rate:.2f}x{vs}"]
        if args.readme_path:
            readme_rate = median_rate(readme_r)
            cells += [f"{readme_rate:.1f}", f"{readme_rate / ours_rate:.2f}x"]
        if args.hf_static:
            if static_error is not None or not static_r:
                cells += [static_error or "failed", "-", "-"]
            else:
                static_rate = median_rate(static_r)
                cells += [f"{static_rate:.1f}", f"{ours_rate / static_rate:.2f}x{vs}", static_same]
        if args.llamacpp:
            if kind:
                ll_rate = median_rate(ll_r)
                ll_roof = bw / llama.gguf(kind).stat().st_size
                cells += [
                    f"{ll_rate:.1f} ({LLAMA_LABEL[kind]})",
                    f"{ours_rate / ll_rate:.2f}x",
                    f"{ll_rate / ll_roof:.0%} of {ll_roof:.0f}",
                ]
            else:
                cells += ["-", "-", "-"]
        cells += [
            f"{ours_rate / roofline:.0%} of {roofline:.0f}",
            same,
            getattr(ours, "inference_format", None) or describe(ours),
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
        if args.prefill and batch == min(args.batch):
            prefill_lines.append(prefill_row(args, weights, ours, hf, llama, device))
    if prefill_lines:
        print(f"\nprefill, {args.prefill} tokens, batch 1 (tok/s, median of {args.repeat} rounds):")
        head = "| weights | transformers | qwen15 | vs transformers |"
        head += " llama.cpp | vs llama.cpp |" if args.llamacpp else ""
        print(head, "|" + " --- |" * head.count(" |"), *prefill_lines, sep="\n", flush=True)
    if saved is not None:
        import shutil

        shutil.rmtree(saved, ignore_errors=True)
    return 0


def prefill_row(args, weights, ours, hf, llama, device) -> str:
    from qwen15.generation import Generator
    from qwen15.sampling import SamplingParams

    prompt = torch.randint(0, 151000, (1, args.prefill), generator=torch.Generator().manual_seed(7))
    engine = Generator(ours, None)

    def run_ours(k):
        engine.generate(prompt.tolist(), max_new_tokens=k, sampling=SamplingParams(), stop_token_ids=[])

    def run_hf(k):
        with torch.inference_mode():
            hf(input_ids=prompt.to(device), logits_to_keep=1)

    kind = LLAMA_TYPE.get(weights) if llama is not None else None
    run_ours(1)
    ours_r, hf_r, ll_r = [], [], []
    for _ in range(args.repeat):
        ours_r.append(args.prefill / timed(run_ours, 1, device))
        if not args.no_reference:
            hf_r.append(args.prefill / timed(run_hf, 1, device))
        if kind:
            ll_r.append(llama.rates(kind, args.prefill, 0)["prefill"])
    o, h = median_rate(ours_r), median_rate(hf_r)
    cells = [weights, f"{h:.0f}", f"{o:.0f}", f"{o / h:.2f}x"]
    if args.llamacpp:
        ll = median_rate(ll_r) if kind else float("nan")
        cells += [f"{ll:.0f}", f"{o / ll:.2f}x"] if kind else ["-", "-"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
