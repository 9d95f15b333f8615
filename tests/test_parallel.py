"""Tensor, pipeline and data parallelism against the single-process model (the oracle), on CPU with gloo.

Processes are started twice per session (module fixtures `two` and `four`, 2 and 4 gloo processes; starting them
costs more than the checks): each builds the same seeded tiny models, splits them every way under test, and
returns what it computed (gathered logits, gradients, losses, updated weights, greedy tokens, stored bytes). The
tests compute the same thing in this one process and compare. The 3-D mesh (8 processes) is a slow test.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from qwen15.model import KVCache, Qwen
from qwen15.model_config import get_preset

VOCAB = 512
# Tiny shapes whose heads split over 4 ranks: tied (0.5B-like), untied MHA, GQA 8/4 (32B-like).
CONFIGS = {
    "tied": get_preset("tiny").replace(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=4),
    "mha": get_preset("tiny-mha").replace(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=4),
    "gqa": get_preset("tiny-gqa").replace(vocab_size=VOCAB, num_attention_heads=8, num_key_value_heads=4),
}
PIPE_CONFIG = CONFIGS["gqa"].replace(num_hidden_layers=4)


# ---------------------------------------------------------------------------------------------- harness


def spawn(fn, world_size: int, *args, timeout: float = 240.0) -> list:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes; returns each rank's return value."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry, args=(world_size, tmp, fn, args), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"{fn.__name__} on {world_size} processes did not finish in {timeout:.0f} s")
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(world_size)]


def _entry(rank: int, world_size: int, tmp: str, fn, args) -> None:
    torch.set_num_threads(1)  # 2-4 processes share 2 cores
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(tmp, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def model_for(cfg, seed: int = 0) -> Qwen:
    """The same model in every process: seeded weights, biases and norms made non-trivial so that a dropped or
    mis-split q/k/v bias or norm weight changes the outputs."""
    model = Qwen.from_config(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def batch(step: int, rows: int = 4, seq: int = 16, documents: bool = False) -> dict[str, torch.Tensor]:
    """Step `step`'s global batch: ids, labels with some ignored tokens, optional packed document ids."""
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=gen)
    labels = torch.randint(0, VOCAB, (rows, seq), generator=gen)
    labels[torch.rand(rows, seq, generator=gen) < 0.2] = -100
    out = {"input_ids": ids, "labels": labels}
    if documents:
        out["document_ids"] = torch.cumsum(torch.rand(rows, seq, generator=gen) < 0.15, dim=1)
    return out


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_params(module) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in module.named_parameters()}


def reference_training(cfg, steps: int, optimizer: str, documents: bool = False):
    """Losses and final weights of the single-process run: mean token loss of the global batch, one update."""
    model = model_for(cfg)
    opt = make_optimizer(model, optimizer)
    losses = []
    for step in range(steps):
        b = batch(step, documents=documents)
        logits = model(b["input_ids"], document_ids=b.get("document_ids"))
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, full_params(model)


def make_optimizer(model, kind: str):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def assert_close_params(got: dict, ref: dict, atol: float):
    assert set(got) == set(ref)
    worst = max((got[n] - ref[n]).abs().max().item() for n in ref)
    assert worst <= atol, f"largest weight difference {worst:.3g}"


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding a DTensor's (or an in-flight collective result's) local data."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor

    while isinstance(t, DTensor | AsyncCollectiveTensor):
        t = t._local_tensor if isinstance(t, DTensor) else t.elem
    return t


def saved_activation_bytes(fn) -> dict[int, int]:
    """Storages (data pointer -> bytes) of the tensors autograd keeps for backward while fn() runs."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = _plain(t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


def local_bytes(tensors) -> int:
    return sum(_plain(t).numel() * _plain(t).element_size() for t in tensors)


def activation_bytes(model, ids, labels) -> int:
    from qwen15.parallel.vocab_parallel_loss import cross_entropy

    params = {_plain(p).untyped_storage().data_ptr() for p in model.parameters()}
    storages = saved_activation_bytes(lambda: cross_entropy(model(ids), labels))
    return sum(n for ptr, n in storages.items() if ptr not in params)


# ---------------------------------------------------------------------------------------------- jobs (in workers)


def _tp_forward_job(mesh, names):
    from qwen15.parallel.tensor_parallel import apply_tensor_parallel
    from qwen15.parallel.vocab_parallel_loss import cross_entropy

    out = {}
    b0, b1 = batch(0, documents=True), batch(1)
    for name in names:
        for sp in (True, False):
            model = apply_tensor_parallel(model_for(CONFIGS[name]), mesh, sequence_parallel=sp)
            with torch.no_grad():
                logits = model(b0["input_ids"])
                packed = model(b0["input_ids"], document_ids=b0["document_ids"])
                last = model(b0["input_ids"], last_only=True)
            out[f"{name}/sp={sp}/logits"] = full(logits)
            out[f"{name}/sp={sp}/last"] = full(last)
            out[f"{name}/sp={sp}/packed"] = full(packed)
            out[f"{name}/sp={sp}/split"] = str(logits.placements)
        # The vocabulary-parallel loss and the gradients it sends back through the split model.
        model = apply_tensor_parallel(model_for(CONFIGS[name]), mesh)
        loss = cross_entropy(model(b1["input_ids"]), b1["labels"], reduction="mean")
        loss.backward()
        out[f"{name}/loss"] = loss.detach()
        out[f"{name}/grads"] = {n: full(p.grad) for n, p in model.named_parameters()}
    # Embedding and output kept whole on every tensor-parallel rank (vocab_parallel=False).
    model = apply_tensor_parallel(model_for(CONFIGS["mha"]), mesh, vocab_parallel=False)
    with torch.no_grad():
        out["mha/replicated-vocab/logits"] = full(model(b0["input_ids"]))
    return out


def _tp_refusal_job(mesh):
    from qwen15.parallel.layout import LayoutError
    from qwen15.parallel.tensor_parallel import apply_tensor_parallel

    try:  # tiny-gqa: 2 kv heads
        apply_tensor_parallel(model_for(get_preset("tiny-gqa").replace(vocab_size=VOCAB)), mesh)
    except LayoutError as e:
        return str(e)
    return ""


def _tp_train_job(mesh, name, steps, optimizer):
    from qwen15.parallel.tensor_parallel import apply_tensor_parallel
    from qwen15.parallel.vocab_parallel_loss import cross_entropy

    model = apply_tensor_parallel(model_for(CONFIGS[name]), mesh)
    opt = make_optimizer(model, optimizer)
    losses = []
    for step in range(steps):
        b = batch(step)
        tokens = (b["labels"] != -100).sum()
        loss = cross_entropy(model(b["input_ids"]), b["labels"]) / tokens
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "params": full_params(model)}


def _inference_job(mesh, names):
    from qwen15.generation import generate
    from qwen15.parallel.inference import shard_for_inference

    out = {}
    prompt = PROMPT
    for name in names:
        model = shard_for_inference(model_for(CONFIGS[name]), mesh)
        with torch.no_grad():
            tokens, cache = greedy(model, prompt, NEW_TOKENS)
            padded, _ = greedy(model, prompt, NEW_TOKENS, pads=PADS)
        out[f"{name}/tokens"] = tokens
        out[f"{name}/padded"] = padded
        out[f"{name}/cache_heads"] = cache.k[0].shape[1]
        k_weight = model.layers["0"].self_attn.k_proj.weight.to_local()
        out[f"{name}/local_kv_heads"] = k_weight.shape[0] // model.config.head_dim
        try:  # the inference engine's own loop (left padding, its cache) on the split model
            done = generate(
                model, None, generate_prompts(), max_new_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[]
            )
            out[f"{name}/generate"] = [c.token_ids for c in done]
        except Exception:  # kept for the test to FAIL with (raising here would hide the other jobs' results)
            out[f"{name}/generate_error"] = traceback.format_exc()
    return out


def _activation_job(mesh):
    from qwen15.parallel.tensor_parallel import apply_tensor_parallel

    model = apply_tensor_parallel(model_for(CONFIGS["gqa"]), mesh)
    b = batch(0, rows=ACT_ROWS, seq=ACT_SEQ)
    return activation_bytes(model, b["input_ids"], b["labels"])


def shard_with_fsdp(model, mesh) -> None:
    """FSDP2 per block and at the root, gradients summed (the loss is already divided by the global tokens)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def _pipeline_job(mesh, schedules, steps):
    """pp 2, with tensor parallel and FSDP2 when the mesh has them; each data-parallel rank takes its rows."""
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.pipeline import build_schedule, stage_modules
    from qwen15.parallel.tensor_parallel import apply_tensor_parallel
    from qwen15.parallel.vocab_parallel_loss import cross_entropy

    tp, dp, dp_rank = mesh["tp"].size(), mesh.dp.size(), mesh.dp.get_local_rank()
    rows = slice(dp_rank * 4 // dp, (dp_rank + 1) * 4 // dp)
    out = {}
    for schedule_name in schedules:
        layout = ParallelLayout(pp=2, tp=tp, dp_shard=dp, pp_schedule=schedule_name, pp_microbatches=4 // dp)
        layout = layout.validate(mesh.size(), PIPE_CONFIG, local_batch_size=4 // dp)
        modules = stage_modules(model_for(PIPE_CONFIG), layout, mesh["pp"].get_local_rank())
        for module in modules:
            if tp > 1:
                apply_tensor_parallel(module, mesh["tp"])
            if dp > 1:
                shard_with_fsdp(module, mesh["dp_shard"])
        param_bytes = sum(local_bytes(m.parameters()) for m in modules)
        step_tokens = torch.zeros(())

        def loss_fn(logits, labels, _tokens=step_tokens):
            return cross_entropy(logits, labels) / _tokens

        schedule = build_schedule(modules, layout, mesh["pp"], loss_fn, "cpu", tp_mesh=mesh["tp"])
        opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in modules]
        losses = []
        for step in range(steps):
            b = {k: v[rows] for k, v in batch(step, documents=True).items()}
            step_tokens.fill_((batch(step)["labels"] != -100).sum().item())  # over the global batch
            micro = []
            schedule.step(b["input_ids"], target=b["labels"], losses=micro, document_ids=b["document_ids"])
            for opt in opts:
                opt.step()
                opt.zero_grad()
            if micro:  # the last stage: its share of the loss, summed over the data-parallel ranks
                total = torch.stack([x.detach() for x in micro]).sum()
                dist.all_reduce(total, group=mesh.dp.get_group())
                losses.append(total.item())
        params = {}
        for module in modules:
            params.update(full_params(module))
        out[schedule_name] = {"losses": losses, "params": params, "param_bytes": param_bytes}
    return out


def _fsdp_tp_job(mesh, steps):
    from qwen15.parallel.tensor_parallel import apply_tensor_parallel
    from qwen15.parallel.vocab_parallel_loss import cross_entropy

    model = apply_tensor_parallel(model_for(CONFIGS["tied"]), mesh["tp"])
    shard_with_fsdp(model, mesh["dp_shard"])
    dp_rank, dp = mesh.dp.get_local_rank(), mesh.dp.size()

    def step_loss(step):
        b = batch(step)
        rows = slice(dp_rank * 4 // dp, (dp_rank + 1) * 4 // dp)
        tokens = (b["labels"] != -100).sum()
        return cross_entropy(model(b["input_ids"][rows]), b["labels"][rows]) / tokens

    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = step_loss(step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh.dp.get_group())
        losses.append(total.item())
    out = {
        "losses": losses,
        "params": full_params(model),
        "tied": model.lm_head.weight is model.embed_tokens.weight,
    }
    # Memory as stored on this rank: parameters, gradients, and AdamW's state after one step.
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_loss(0).backward()
    out["grad_bytes"] = local_bytes(p.grad for p in model.parameters())
    adamw.step()
    out["param_bytes"] = local_bytes(model.parameters())
    out["optimizer_bytes"] = local_bytes(t for state in adamw.state.values() for t in state.values())
    return out


# ---------------------------------------------------------------------------------------------- the spawned runs

PROMPT = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
NEW_TOKENS = 12
PADS = [0, 3]
ACT_ROWS, ACT_SEQ = 2, 64
TRAIN_RUNS_2 = [("tied", "sgd"), ("gqa", "sgd"), ("mha", "adamw")]
TRAIN_RUNS_4 = [("gqa", "sgd")]
SCHEDULES = ["1F1B", "GPipe", "Interleaved1F1B"]
STEPS = 3
PIPE_STEPS = 2


def generate_prompts() -> list[list[int]]:
    return [PROMPT[0].tolist(), PROMPT[1, 3:].tolist()]  # different lengths: left padding


def _two_ranks(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from qwen15.parallel.layout import ParallelLayout, build_mesh

    tp_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    out = {"forward": _tp_forward_job(tp_mesh, list(CONFIGS)), "refusal": _tp_refusal_job(tp_mesh)}
    out["train"] = {f"{n}/{o}": _tp_train_job(tp_mesh, n, STEPS, o) for n, o in TRAIN_RUNS_2}
    out["inference"] = _inference_job(tp_mesh, ["tied", "gqa"])
    out["activations"] = _activation_job(tp_mesh)
    pp_mesh = build_mesh(ParallelLayout(pp=2, dp_shard=1), "cpu")
    out["pipeline"] = _pipeline_job(pp_mesh, SCHEDULES, PIPE_STEPS)
    return out


def _four_ranks(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from qwen15.parallel.layout import ParallelLayout, build_mesh

    tp_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    out = {"forward": _tp_forward_job(tp_mesh, list(CONFIGS)), "refusal": _tp_refusal_job(tp_mesh)}
    out["train"] = {f"{n}/{o}": _tp_train_job(tp_mesh, n, STEPS, o) for n, o in TRAIN_RUNS_4}
    out["pipeline"] = _pipeline_job(
        build_mesh(ParallelLayout(pp=2, tp=2, dp_shard=1), "cpu"), ["1F1B"], PIPE_STEPS
    )
    fsdp_mesh = build_mesh(ParallelLayout(dp_shard=2, tp=2), "cpu")
    out["fsdp"] = _fsdp_tp_job(fsdp_mesh, STEPS)
    out["coords"] = {
        "pp": 0,
        "tp": fsdp_mesh["tp"].get_local_rank(),
        "dp": fsdp_mesh.dp.get_local_rank(),
    }
    return out


@pytest.fixture(scope="module")
def two():
    return spawn(_two_ranks, 2)


@pytest.fixture(scope="module")
def four():
    return spawn(_four_ranks, 4)


@pytest.fixture(autouse=True)
def _deterministic_oracles():
    """The single-process computations the tests compare with run as in any process (test_train_helpers)."""
    from test_train_helpers import deterministic

    with deterministic():
        yield


@pytest.fixture(params=[2, 4], ids=["tp2", "tp4"])
def tp_results(request):
    return request.getfixturevalue({2: "two", 4: "four"}[request.param])


# ---------------------------------------------------------------------------------------------- tests


def _reference_forward(name):
    model = model_for(CONFIGS[name])
    b0, b1 = batch(0, documents=True), batch(1)
    with torch.no_grad():
        logits = model(b0["input_ids"])
        packed = model(b0["input_ids"], document_ids=b0["document_ids"])
    loss = F.cross_entropy(model(b1["input_ids"]).flatten(0, 1), b1["labels"].flatten(), ignore_index=-100)
    loss.backward()
    return logits, packed, loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_tensor_parallel_logits_match_one_process(tp_results):
    for name in CONFIGS:
        ref, ref_packed, _, _ = _reference_forward(name)
        for out in tp_results:
            got = out["forward"]
            for sp in (True, False):
                assert (
                    "Shard(dim=2)" in got[f"{name}/sp={sp}/split"]
                )  # the logits stay split over the vocabulary
                assert (got[f"{name}/sp={sp}/logits"] - ref).abs().max().item() <= 2e-5, (name, sp)
                assert (got[f"{name}/sp={sp}/packed"] - ref_packed).abs().max().item() <= 2e-5, (name, sp)
                assert (got[f"{name}/sp={sp}/last"] - ref[:, -1:]).abs().max().item() <= 2e-5, (name, sp)
    ref = _reference_forward("mha")[0]
    for out in tp_results:
        assert (out["forward"]["mha/replicated-vocab/logits"] - ref).abs().max().item() <= 2e-5


def test_vocab_parallel_loss_and_gradients_match_one_process(tp_results):
    for name in CONFIGS:
        _, _, ref_loss, ref_grads = _reference_forward(name)
        for out in tp_results:
            got = out["forward"]
            assert got[f"{name}/loss"].item() == pytest.approx(ref_loss, abs=1e-5)
            for n, g in ref_grads.items():
                assert (got[f"{name}/grads"][n] - g).abs().max().item() <= 1e-5, (name, n)


def test_fewer_kv_heads_than_ranks_is_refused(two, four):
    assert two[0]["refusal"] == ""  # 2 kv heads over 2 ranks: one each
    assert "num_key_value_heads 2 is not divisible by tp" in four[0]["refusal"]


def test_tensor_parallel_training_matches_one_process(tp_results):
    runs = TRAIN_RUNS_2 if len(tp_results) == 2 else TRAIN_RUNS_4
    for name, optimizer in runs:
        ref_losses, ref_params = reference_training(CONFIGS[name], STEPS, optimizer)
        for out in tp_results:
            got = out["train"][f"{name}/{optimizer}"]
            assert got["losses"] == pytest.approx(ref_losses, abs=2e-5), name
            # AdamW turns a gradient that is zero in exact arithmetic (the k bias: softmax ignores a constant
            # shift) into +-lr steps from rounding noise, so its weights are compared more loosely.
            assert_close_params(got["params"], ref_params, atol=2e-5 if optimizer == "sgd" else 4e-3)


def _check_pipeline(results, schedules, reporting_ranks=None):
    ref_losses, ref_params = reference_training(PIPE_CONFIG, PIPE_STEPS, "sgd", documents=True)
    for schedule_name in schedules:
        params, reporting = {}, 0
        for out in results:
            got = out["pipeline"][schedule_name]
            params.update(got["params"])
            if got["losses"]:
                reporting += 1
                assert got["losses"] == pytest.approx(ref_losses, abs=2e-5), schedule_name
        assert reporting == (reporting_ranks or len(results) // 2)  # the ranks of the last stage
        assert_close_params(params, ref_params, atol=3e-5)


def test_pipeline_two_stages_each_schedule_matches_one_process(two):
    _check_pipeline(two, SCHEDULES)


def test_pipeline_with_tensor_parallel_matches_one_process(four):
    _check_pipeline(four, ["1F1B"])


def test_fsdp_with_tensor_parallel_matches_one_process(four):
    ref_losses, ref_params = reference_training(CONFIGS["tied"], STEPS, "sgd")
    for out in four:
        assert out["fsdp"]["tied"]  # the 0.5B family's tied output layer stays one parameter
        assert out["fsdp"]["losses"] == pytest.approx(ref_losses, abs=2e-5)
        assert_close_params(out["fsdp"]["params"], ref_params, atol=2e-5)


def greedy(model, prompt: torch.Tensor, new_tokens: int, pads: list[int] | None = None):
    """Prefill, then one token at a time through a KV cache; argmax each step. pads: left padding per row
    (masked out of attention, positions starting at each row's first real token)."""
    b, n = prompt.shape
    cache = KVCache(len(model.layers), b, n + new_tokens)
    pad = torch.tensor(pads or [0] * b)
    key_mask = torch.arange(n + new_tokens)[None, :] >= pad[:, None] if pads else None
    positions = (torch.arange(n)[None, :] - pad[:, None]).clamp(min=0)
    logits = model(
        prompt,
        position_ids=positions,
        kv_cache=cache,
        cache_positions=torch.arange(n),
        key_padding_mask=key_mask,
        last_only=True,
    )
    tokens = [logits[:, -1].argmax(-1)]
    for i in range(new_tokens - 1):
        slot = torch.tensor([n + i])
        logits = model(
            tokens[-1][:, None],
            position_ids=(slot - pad)[:, None],
            kv_cache=cache,
            cache_positions=slot,
            key_padding_mask=key_mask,
            last_only=True,
        )
        tokens.append(logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1), cache


def test_tensor_parallel_greedy_decoding_matches_one_process(two):
    for name in ("tied", "gqa"):
        model = model_for(CONFIGS[name]).eval()
        with torch.no_grad():
            ref, _ = greedy(model, PROMPT, NEW_TOKENS)
            ref_padded, _ = greedy(model, PROMPT, NEW_TOKENS, pads=PADS)
        for out in two:
            got = out["inference"]
            assert torch.equal(got[f"{name}/tokens"], ref), name
            assert torch.equal(got[f"{name}/padded"], ref_padded), name
            local_heads = CONFIGS[name].num_key_value_heads // 2
            assert got[f"{name}/cache_heads"] == got[f"{name}/local_kv_heads"] == local_heads


def test_generate_on_a_tensor_parallel_model(two):
    """qwen15.generation's own loop (its preallocated cache of local_kv_heads heads) on a model split over 2
    ranks gives the single-process greedy tokens; an exception in a worker fails the test with its traceback."""
    from qwen15.generation import generate

    for name in ("tied", "gqa"):
        model = model_for(CONFIGS[name]).eval()
        want = generate(
            model, None, generate_prompts(), max_new_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[]
        )
        for rank, out in enumerate(two):
            got = out["inference"]
            if f"{name}/generate_error" in got:
                pytest.fail(f"generate on rank {rank} ({name}) raised:\n{got[f'{name}/generate_error']}")
            assert got[f"{name}/generate"] == [c.token_ids for c in want], (name, rank)


# ---------------------------------------------------------------------------------------------- memory accounting


def test_memory_estimate_is_exact_for_stored_bytes_under_fsdp_and_tp(four):
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.memory import estimate_memory

    est = estimate_memory(
        CONFIGS["tied"],
        ParallelLayout(dp_shard=2, tp=2),
        micro_batch_size=2,
        seq_len=16,
        param_dtype="float32",
        compute_dtype="float32",
        optimizer="adamw",
    )
    for out in four:
        got = out["fsdp"]
        assert got["param_bytes"] == est.parameters
        assert got["grad_bytes"] == est.gradients
        assert got["optimizer_bytes"] == est.optimizer


def test_memory_estimate_is_exact_for_pipeline_stage_parameters(two, four):
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.memory import estimate_memory

    for results, tp in ((two, 1), (four, 2)):
        for rank, out in enumerate(results):
            pp_rank = rank // tp
            for schedule_name, got in out["pipeline"].items():
                layout = ParallelLayout(pp=2, tp=tp, dp_shard=1, pp_schedule=schedule_name, pp_microbatches=4)
                est = estimate_memory(
                    PIPE_CONFIG,
                    layout,
                    micro_batch_size=1,
                    seq_len=16,
                    param_dtype="fp32",
                    compute_dtype="fp32",
                    pp_rank=pp_rank,
                )
                assert got["param_bytes"] == est.parameters, (schedule_name, rank)


def test_memory_estimate_activations_under_tensor_parallel(two):
    from qwen15.parallel.layout import ParallelLayout
    from qwen15.parallel.memory import estimate_memory

    est = estimate_memory(
        CONFIGS["gqa"],
        ParallelLayout(tp=2, dp_shard=1),
        micro_batch_size=ACT_ROWS,
        seq_len=ACT_SEQ,
        param_dtype="fp32",
        compute_dtype="fp32",
    )
    for out in two:
        ratio = out["activations"] / est.activations
        assert abs(ratio - 1) <= 0.05, f"measured / estimated activation bytes = {ratio:.3f}"


def _three_dims(rank, world_size):
    from qwen15.parallel.layout import ParallelLayout, build_mesh

    mesh = build_mesh(ParallelLayout(pp=2, dp_shard=2, tp=2), "cpu")
    return {"pipeline": _pipeline_job(mesh, ["1F1B"], PIPE_STEPS)}


@pytest.mark.slow
def test_pipeline_fsdp_and_tensor_parallel_on_a_3d_mesh_match_one_process():
    results = spawn(_three_dims, 8, timeout=400)
    _check_pipeline(results, ["1F1B"], reporting_ranks=4)  # last stage: 2 data-parallel x 2 tensor-parallel
