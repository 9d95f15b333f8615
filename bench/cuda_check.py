"""Correctness on a GPU (the test suite runs on CPU only): each check against transformers or our own CPU path.

  python bench/cuda_check.py                # on a CUDA machine
  python bench/cuda_check.py --device cpu   # the same checks here, to test the script itself

1. logits of tiny random models (MHA, GQA, tied and untied) equal transformers' on the device, fp32 and bf16;
2. greedy generation — the static-shape decode step with CUDA graphs (also with fused projections, as
   the commands run it), and the eager one — equals transformers' `generate` in fp32 for a batch of prompts of different lengths, 64 new tokens;
   the continuous-batching engine (staggered arrivals, 4 slots, chunked prefill), its CUDA-graph step and its
   eager one, equals transformers' greedy tokens of each prompt alone;
3. int8 weight-only decoding agrees with bf16 (share of equal greedy tokens, printed);
4. the output layer + cross-entropy that train.compile compiles equals the eager one (loss and gradients, bf16
   autocast, the real vocabulary), and how long each takes;
5. the trainer on the device (bf16 compute over fp32 master weights), eager and with train.compile, against an fp32
   CPU run from the same initial weights on the same batches: losses within bf16 rounding, the same first update
   (cosine), and 8 steps drive the loss down; a control with other weights must fail that comparison.
Every check prints PASS or FAIL with its figures; the exit status is the number of failures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from qwen15.model_config import get_preset  # noqa: E402

from conftest import load_into_ours, random_hf_model  # noqa: E402

VOCAB = 1000
FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def hf_greedy(hf, prompts, new_tokens, device):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, width:].tolist()


def check_logits(device) -> None:
    for preset in ("tiny", "tiny-mha", "tiny-gqa"):
        cfg = get_preset(preset).replace(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None)
        for dtype in (torch.float32, torch.bfloat16):
            hf = random_hf_model(cfg)
            ours = load_into_ours(hf, cfg).to(device=device, dtype=dtype)
            inv_freq = hf.model.rotary_emb.inv_freq.clone()
            hf = hf.to(device=device, dtype=dtype)
            # as transformers loads a bf16 checkpoint: rotary inv_freq stays fp32 (`.to` alone would round it)
            hf.model.rotary_emb.inv_freq = inv_freq.to(device)
            ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(3)).to(device)
            with torch.inference_mode():
                a = ours(ids).float()
                b = hf(input_ids=ids).logits.float()
            diff = (a - b).abs().max().item()
            scale = b.abs().max().item()
            # bf16: kernels may pick different reduction orders on a GPU; allow a few bf16 ulps of the scale
            bound = 1e-4 if dtype == torch.float32 else 2**-6 * scale
            report(
                f"logits {preset} {str(dtype)[6:]}",
                diff <= bound,
                f"max |diff| {diff:.2e} (bound {bound:.1e})",
            )


def check_greedy(device) -> None:
    from qwen15.generation import Generator
    from qwen15.sampling import SamplingParams

    cfg = get_preset("tiny-gqa").replace(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None)
    hf = random_hf_model(cfg).to(device)
    ours = load_into_ours(hf.cpu(), cfg).to(device)
    hf = hf.to(device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 11)]
    with torch.inference_mode():
        ref = hf_greedy(hf, prompts, 64, device)
    from qwen15.fuse import fuse_projections

    fused = fuse_projections(load_into_ours(hf.cpu(), cfg).to(device))  # as the commands run it
    hf = hf.to(device)
    for compiled, model in ((False, ours), (True, ours), (True, fused)):
        engine = Generator(model, None, compile=compiled)
        for attempt in range(2):  # the second call reuses the recorded CUDA graphs and static buffers
            outs = engine.generate(prompts, max_new_tokens=64, sampling=SamplingParams(), stop_token_ids=[])
            got = [o.token_ids for o in outs]
            kind = ("compiled+cudagraphs" if compiled else "eager") + (", fused" if model is fused else "")
            report(
                f"greedy fp32 {kind} call {attempt + 1}",
                got == ref,
                f"{sum(a == b for r, o in zip(ref, got) for a, b in zip(r, o))}/{3 * 64} tokens equal transformers",
            )


def check_int8(device) -> None:
    from qwen15.generation import Generator
    from qwen15.quantize import quantize_int8, weight_nbytes
    from qwen15.sampling import SamplingParams

    cfg = get_preset("tiny-gqa").replace(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None)
    hf = random_hf_model(cfg)
    bf16 = load_into_ours(hf, cfg).to(device=device, dtype=torch.bfloat16)
    q = quantize_int8(load_into_ours(hf, cfg).to(device=device, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (12,), generator=g).tolist() for _ in range(4)]
    kw = dict(max_new_tokens=32, sampling=SamplingParams(), stop_token_ids=[])
    a = [o.token_ids for o in Generator(bf16, None).generate(prompts, **kw)]
    b = [o.token_ids for o in Generator(q, None).generate(prompts, **kw)]
    first = sum(r[0] == o[0] for r, o in zip(a, b))
    same = sum(x == y for r, o in zip(a, b) for x, y in zip(r, o))
    ratio = weight_nbytes(q) / weight_nbytes(bf16)
    report(
        "int8 greedy vs bf16",
        first >= 3 and ratio < 0.6,
        f"first tokens {first}/4 equal, all tokens {same}/{4 * 32} equal; weights {ratio:.2f}x of bf16",
    )


def check_engine(device) -> None:
    """Continuous batching on the device: sequences arriving at different steps, with free slots between them in
    the batch, decoded by the static step (CUDA graphs per batch/length bucket) equal the eager step's tokens and
    transformers' greedy tokens of each prompt alone."""
    from qwen15.engine.engine import Engine, SequenceParams

    cfg = get_preset("tiny-gqa").replace(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None)
    hf = random_hf_model(cfg).to(device)
    ours = load_into_ours(hf.cpu(), cfg).to(device)
    hf = hf.to(device)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 40, 1, 17, 300)]
    arrive, new = (0, 0, 3, 5, 9), (40, 12, 30, 8, 20)
    with torch.inference_mode():
        ref = [hf_greedy(hf, [p], n, device)[0] for p, n in zip(prompts, new)]
    for static in (False, True):
        engine = Engine(ours, num_slots=4, max_len=512, prefill_chunk=64, static=static)
        out: dict[int, list[int]] = {}
        ids = []
        for step in range(400):
            for i, k in enumerate(arrive):
                if k == step:
                    ids += engine.add(prompts[i], SequenceParams(max_tokens=new[i]))
            for e in engine.step():
                if e.token is not None:
                    out.setdefault(e.seq_id, []).append(e.token)
            if step > max(arrive) and not engine.busy:
                break
        got = [out.get(i, []) for i in ids]
        shapes = engine.decode.captured
        report(
            f"engine {'static (CUDA graphs)' if static else 'eager'}, staggered arrivals",
            got == ref,
            f"{sum(a == b for r, o in zip(ref, got) for a, b in zip(r, o))}/{sum(new)} tokens equal transformers"
            + (f"; graphs captured for (batch, keys) {shapes}" if static else ""),
        )


def check_trainer(device) -> None:
    """The trainer on the device (bf16 compute over fp32 master weights), eager and with train.compile, against
    the same trainer in fp32 on CPU from the same initial weights (copied over: the seeded init draws from the
    device's own generator, so a CUDA run and a CPU run of one seed start from different weights) on the same 8
    batches. Compared: every step's loss within 2**-8 relative (one bf16 rounding unit of the loss: bf16 keeps 8
    significant bits; the CPU run of this script measured 2.2e-4, and 8.3e-3 for the control), and the first
    update (weights after step 1 minus before) with cosine similarity >= 0.9 to the fp32 one (measured 0.996; the
    control -0.0002). The control — the same comparison from other initial weights — must fail it, or the check
    could not tell."""
    from qwen15.data.writer import write_documents
    from qwen15.train.config import load_config
    from qwen15.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        rows = np.random.default_rng(0).integers(0, 512, (64, 129)).astype(np.uint32)
        rows[:, 1::2] = rows[:, 0:-1:2]  # learnable: every odd token repeats the one before it
        data = write_documents(
            Path(tmp) / "data", [(r, [True] * len(r)) for r in rows.tolist()], seq_length=128, layout="pad"
        )

        def trainer(dev, run, compile=False, dtype="auto", seed=3):
            args = [
                "--train.compile", str(compile).lower(), "--train.dtype", dtype,
                "--model.preset", "tiny", "--model.vocab_size", "512", "--model.init_seed", str(seed),
                "--data.path", str(data),
                "--train.run_dir", str(Path(tmp) / run), "--train.global_batch_size", "8",
                "--train.micro_batch_size", "4", "--train.device", dev, "--train.steps", "20",
                "--optim.lr", "3e-3", "--optim.warmup_steps", "2", "--metrics.plot", "false",
                "--metrics.tensorboard", "false", "--checkpoint.resume", "never",
                "--checkpoint.save_at_end", "false",
            ]  # fmt: skip
            return Trainer(load_config(None, args), echo=lambda m: None)

        def weights(t):
            return {k: v.detach().float().cpu().clone() for k, v in t.model.state_dict().items()}

        def run(t, initial=None):
            """Losses of 8 steps and the first update, from `initial` weights when given."""
            if initial is not None:
                t.model.load_state_dict({k: v.to(t.device) for k, v in initial.items()})
            before, losses, update = weights(t), [], None
            for i in range(8):
                losses.append(float(t.train_step(t.dataset.batch(list(range(8 * i, 8 * i + 8))))["loss"]))
                if i == 0:
                    update = {k: v - before[k] for k, v in weights(t).items()}
            t.close()
            return losses, update

        cpu = trainer("cpu", "cpu", dtype="float32")
        initial = weights(cpu)
        ref_losses, ref_update = run(cpu)

        def compare(losses, update):
            rel = max(abs(a - b) / b for a, b in zip(losses, ref_losses))
            dot = sum(float((update[k] * ref_update[k]).sum()) for k in update)
            norms = [sum(float(u[k].pow(2).sum()) for k in u) ** 0.5 for u in (update, ref_update)]
            cosine = dot / (norms[0] * norms[1])
            return rel, cosine, rel <= 2**-8 and cosine >= 0.9

        low = "bfloat16" if device.type == "cpu" else "auto"  # auto: bf16 on CUDA
        for compile in (False, True):
            losses, update = run(trainer(device.type, f"dev-{compile}", compile, low), initial)
            rel, cosine, ok = compare(losses, update)
            report(
                f"trainer on {device.type} (bf16 compute, fp32 master{', compiled' if compile else ''}) vs fp32 CPU",
                ok and losses[-1] < losses[0] - 0.3,
                f"losses {losses[0]:.4f} -> {losses[-1]:.4f} vs {ref_losses[0]:.4f} -> {ref_losses[-1]:.4f}, "
                f"max relative difference {rel:.1e} (bound {2**-8:.1e}); first update cosine {cosine:.4f}",
            )
        other, other_update = run(trainer(device.type, "control", False, low, seed=4))
        rel, cosine, ok = compare(other, other_update)
        report(
            "control: other initial weights are told apart",
            not ok,
            f"max relative loss difference {rel:.1e}, first update cosine {cosine:.4f}",
        )


def check_compiled_loss(device) -> None:
    """The output layer + cross-entropy as train.compile runs it, at the real vocabulary, under bf16 autocast:
    the loss and both gradients against the eager computation, and the time of forward + backward."""
    from qwen15.train.loss import compiled_output_loss, output_loss

    g = torch.Generator(device).manual_seed(0)
    tokens = 2048 if device.type == "cuda" else 64  # the CPU run only tests the script
    hidden = torch.randn(2, tokens, 1024, device=device, generator=g).requires_grad_()
    weight = (0.02 * torch.randn(151936, 1024, device=device, generator=g)).requires_grad_()
    labels = torch.randint(0, 151936, (2, tokens), device=device, generator=g)
    labels[:, : tokens // 20] = -100
    results, times = {}, {}
    for name, fn in (("eager", output_loss), ("compiled", compiled_output_loss)):
        for _ in range(4):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device.type, torch.bfloat16):
                loss = fn(hidden, weight, labels)
            grads = torch.autograd.grad(loss, (hidden, weight))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name] = time.perf_counter() - t  # the last of 4 (the first compiles)
        results[name] = (loss.detach().float(), *(x.float() for x in grads))
    e, c = results["eager"], results["compiled"]
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(c, e)]
    report(
        "compiled output loss (bf16 autocast, vocab 151936)",
        max(rel) < 1e-2,
        f"relative diff loss {rel[0]:.1e}, grad hidden {rel[1]:.1e}, grad weight {rel[2]:.1e}; "
        f"fwd+bwd {1e3 * times['compiled']:.1f} ms vs eager {1e3 * times['eager']:.1f} ms",
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# cuda_check on {name}, torch {torch.__version__}", flush=True)
    for check in (check_logits, check_greedy, check_engine, check_int8, check_compiled_loss, check_trainer):
        try:
            check(device)
        except Exception:
            traceback.print_exc()
            report(check.__name__, False, "raised (traceback above)")
    print(f"# {len(FAILURES)} failure(s): {FAILURES}" if FAILURES else "# all checks passed", flush=True)
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
