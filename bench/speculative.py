"""Speculative decoding speed: greedy speculative_generate(target, draft) against plain greedy generate(target),
same process, same prompt, batch 1.

    python bench/speculative.py                                   # random 0.5B-shaped target, tiny draft
    python bench/speculative.py --target DIR --draft DIR --device cuda --dtype bf16 --k 2 4 6
    python bench/speculative.py --tiny --new-tokens 8 --repeat 1  # seconds, for tests

With random weights the draft and the target agree on almost nothing, so acceptance (and the speed that follows
from it) says nothing about real checkpoints: such rows show the cost of drafting when every draft is rejected.
Each row also prints the speedup the standard formula predicts at acceptance rates 0.6 and 0.8 from the step
costs measured here, (1 - a^(k+1)) / ((1 - a)(1 + k c)), c = time of a plain generate with the draft over that with
the target: an estimate, not a measurement. Times are the best of --repeat runs, the engines taking turns (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeat: int, device: torch.device):
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def load(args, device, dtype):
    """(target, draft, tokenizer or None, description)."""
    from qwen15 import Qwen, Tokenizer, get_preset
    from qwen15.prepare import prepare_for_inference

    if args.target:
        target = Qwen.from_pretrained(args.target, dtype=dtype, device=device)
        draft = Qwen.from_pretrained(args.draft, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_pretrained(args.target)
        what = f"target {args.target}, draft {args.draft}"
    else:
        if args.tiny:
            shape = dict(vocab_size=512, bos_token_id=None, eos_token_id=None)
            t_cfg = get_preset("tiny-mha").replace(**shape)
            d_cfg = get_preset("tiny").replace(num_hidden_layers=1, **shape)
        else:
            t_cfg = get_preset(args.target_preset)
            d_cfg = get_preset(args.draft_preset)
        target = Qwen.from_config(t_cfg, dtype=dtype, device=device, seed=0)
        draft = Qwen.from_config(d_cfg, dtype=dtype, device=device, seed=1)
        tokenizer = None
        names = ("tiny-mha", "tiny with 1 layer") if args.tiny else (args.target_preset, args.draft_preset)
        what = f"random weights (acceptance is meaningless); target {names[0]}, draft {names[1]}"
    return prepare_for_inference(target), prepare_for_inference(draft), tokenizer, what


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="target checkpoint folder (with --draft)")
    p.add_argument("--draft", help="draft checkpoint folder")
    p.add_argument("--target-preset", default="qwen1.5-0.5b")
    p.add_argument("--draft-preset", default="tiny")
    p.add_argument("--tiny", action="store_true", help="tiny shapes with a 512-token vocabulary (for tests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--k", nargs="+", type=int, default=[2, 4])
    p.add_argument("--prompt", default="The history of the city began", help="used with a tokenizer")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length without a tokenizer")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.target) != bool(args.draft):
        p.error("--target and --draft go together")

    from qwen15.generation import generate
    from qwen15.speculative import speculative_generate

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    target, draft, tokenizer, what = load(args, device, dtype)
    if tokenizer is not None:
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = torch.randint(
            0, 500, (args.prompt_len,), generator=torch.Generator().manual_seed(0)
        ).tolist()
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    n = args.new_tokens
    print(
        f"# speculative decoding bench: {what}; {machine}, torch {torch.__version__}, {args.dtype}; prompt "
        f"{len(prompt)} tokens, {n} new tokens, greedy, best of {args.repeat}",
        flush=True,
    )

    def plain(model):
        return lambda: generate(model, tokenizer, prompt, max_new_tokens=n, temperature=0, stop_token_ids=[])

    print(
        "| k | plain tok/s | speculative tok/s | ratio | acceptance | tokens per target forward "
        "| predicted ratio at a=0.6 / 0.8 | same greedy tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for model in (target, draft):  # warm-up: first calls pay for allocations and kernel choices
        generate(model, tokenizer, prompt, max_new_tokens=2, temperature=0, stop_token_ids=[])
    speculative_generate(
        target, draft, tokenizer, prompt, k=2, max_new_tokens=4, temperature=0, stop_token_ids=[]
    )
    draft_time, _ = best_time(plain(draft), args.repeat, device)
    all_same = True
    for k in args.k:
        target_time, ref = best_time(plain(target), args.repeat, device)

        def spec(k=k):
            return speculative_generate(
                target, draft, tokenizer, prompt, k=k, max_new_tokens=n, temperature=0, stop_token_ids=[]
            )

        spec_time, out = best_time(spec, args.repeat, device)
        c = draft_time / target_time
        predicted = [(1 - a ** (k + 1)) / ((1 - a) * (1 + k * c)) for a in (0.6, 0.8)]
        same = "yes" if out.token_ids == ref.token_ids else "NO"
        print(
            f"| {k} | {n / target_time:.1f} | {n / spec_time:.1f} | {target_time / spec_time:.2f} "
            f"| {out.acceptance_rate:.2f} | {len(out.token_ids) / out.target_forwards:.2f} "
            f"| {predicted[0]:.2f} / {predicted[1]:.2f} | {same} |",
            flush=True,
        )
        all_same = all_same and same == "yes"
    print(f"same greedy tokens: {'yes' if all_same else 'NO'}")
    return 0 if all_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
