"""The continuous-batching engine: sequences that join, wait, get chunked, reuse a prefix, sample with their own
settings or get cancelled produce exactly the tokens each gets alone (fp32; `generate` of one prompt, itself
checked against transformers in test_generate.py), and the step log shows how they were batched."""

from __future__ import annotations

import json

import pytest
import torch

from qwen15 import Qwen
from qwen15.engine.engine import Engine, QueueFull, SequenceParams
from qwen15.engine.kv_slots import size_slots
from qwen15.generation import generate
from qwen15.model_config import get_preset
from qwen15.sampling import SamplingParams

VOCAB = 1000
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def model():
    """GQA, untied; biases and norms non-trivial and weights sharpened, so greedy picks have clear margins."""
    cfg = get_preset("tiny-gqa").replace(vocab_size=VOCAB, max_position_embeddings=128)
    m = Qwen.from_config(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.mul_(4.0)
    return m.eval()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, max_tokens, sampling=GREEDY, seed=None):
    return generate(
        model,
        None,
        prompt,
        max_new_tokens=max_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty,
        seed=seed,
        stop_token_ids=[],
    ).token_ids


def drive(engine, arrivals: dict[int, list[tuple[list[int], SequenceParams]]], steps: int = 500):
    """Add arrivals[k] before step k; the tokens of every sequence, by id, in order of arrival."""
    out: dict[int, list[int]] = {}
    order = []
    for k in range(steps):
        for prompt, params in arrivals.get(k, []):
            (sid,) = engine.add(prompt, params)
            out[sid] = []
            order.append(sid)
        for e in engine.step():
            if e.token is not None:
                out[e.seq_id].append(e.token)
        if k > max(arrivals) and not engine.busy:
            break
    return [out[s] for s in order], order


def test_sequences_joining_waiting_and_chunked_get_their_tokens_alone(model, tmp_path):
    lengths = (5, 40, 1, 17, 9, 30)
    new = (12, 6, 20, 8, 15, 10)
    ps = prompts(lengths)
    arrive = (0, 0, 3, 5, 5, 9)
    arrivals: dict[int, list] = {}
    for p, n, k in zip(ps, new, arrive):
        arrivals.setdefault(k, []).append((p, SequenceParams(max_tokens=n)))
    log = tmp_path / "steps.jsonl"
    engine = Engine(model, num_slots=4, max_len=128, prefill_chunk=16, step_log_path=str(log))
    got, ids = drive(engine, arrivals)
    assert got == [alone(model, p, n) for p, n in zip(ps, new)]

    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert steps == list(engine.step_log)
    running = set()
    for s in steps:  # never more sequences than slots
        running |= {a[0] for a in s.get("admitted", [])}
        assert len(running) <= 4
        running -= {f[0] for f in s.get("finished", [])}
    # the 40-token prompt is prefilled in chunks of 16 tokens, while the first prompt already decodes
    chunks = [(s["step"], p) for s in steps for p in s.get("prefill", []) if p[0] == ids[1]]
    assert [p[1:] for _, p in chunks] == [[0, 16], [16, 16], [32, 8]]
    assert any(ids[0] in s.get("decode", []) for s in steps if s["step"] == chunks[1][0])
    # later arrivals join the running batch: decoded in the same step as a sequence that started before them
    first_decode = {sid: min(s["step"] for s in steps if sid in s.get("decode", [])) for sid in ids}
    last_decode = {sid: max(s["step"] for s in steps if sid in s.get("decode", [])) for sid in ids}
    joined = [b for b in ids[2:] if any(first_decode[b] < last_decode[a] for a in ids[:2])]
    assert joined, "no sequence joined while earlier ones decoded"
    # the fifth and sixth waited for a slot (4 slots) and were admitted when one freed
    admitted_at = {a[0]: s["step"] for s in steps for a in s.get("admitted", [])}
    assert admitted_at[ids[5]] > 9 or admitted_at[ids[4]] > 5


def test_per_sequence_sampling_in_one_batch(model):
    ps = prompts((7, 12, 3), seed=2)
    settings = [(GREEDY, None), (SAMPLED, 123), (SamplingParams(repetition_penalty=1.3), None)]
    arrivals = {
        0: [(p, SequenceParams(max_tokens=16, sampling=s, seed=seed)) for p, (s, seed) in zip(ps, settings)]
    }
    got, _ = drive(Engine(model, num_slots=3, max_len=64), arrivals)
    assert got == [alone(model, p, 16, s, seed) for p, (s, seed) in zip(ps, settings)]
    again, _ = drive(Engine(model, num_slots=3, max_len=64), arrivals)
    assert again == got  # a seeded sequence is reproducible whatever runs beside it


def test_n_choices_are_seeded_apart_and_share_the_prompt(model):
    (p,) = prompts((20,), seed=5)
    engine = Engine(model, num_slots=4, max_len=64)
    ids = engine.add(p, SequenceParams(max_tokens=10, sampling=SAMPLED, seed=40), n=3)
    events = engine.run_until_idle()
    got = {i: [e.token for e in events if e.seq_id == i and e.token is not None] for i in ids}
    assert [got[i] for i in ids] == [alone(model, p, 10, SAMPLED, 40 + i) for i in range(3)]
    admitted = {a[0]: a[2] for s in engine.step_log for a in s.get("admitted", [])}
    assert [admitted[i] for i in ids] == [0, 19, 19]  # choices 1 and 2 copy the prompt's KV from choice 0
    assert engine.stats.reused_tokens == 38


def test_prefix_reuse_from_a_finished_and_from_a_running_sequence(model):
    (p,) = prompts((24,), seed=6)
    engine = Engine(model, num_slots=3, max_len=128)
    (first,) = engine.add(p, SequenceParams(max_tokens=10))
    out = [e.token for e in engine.run_until_idle() if e.token is not None]
    # the next turn resends prompt and reply: their KV is in the retired slot (the last reply token never was)
    follow = p + out + prompts((6,), seed=7)[0]
    busy = p[:20] + prompts((5,), seed=8)[0]
    (sid,) = engine.add(follow, SequenceParams(max_tokens=8))
    events = engine.step()
    (other,) = engine.add(busy, SequenceParams(max_tokens=8))  # shares 20 tokens with the running one
    events += engine.run_until_idle()
    admitted = {a[0]: a for s in engine.step_log for a in s.get("admitted", [])}
    assert admitted[sid][2] == 24 + 9 and admitted[sid][1] == admitted[first][1]  # same slot, no copy
    assert admitted[other][2] == 20 and admitted[other][1] != admitted[sid][1]  # copied from the busy slot
    assert [e.token for e in events if e.seq_id == sid and e.token is not None] == alone(model, follow, 8)
    assert [e.token for e in events if e.seq_id == other and e.token is not None] == alone(model, busy, 8)
    assert engine.stats.reused_tokens == 33 + 20
    off = Engine(model, num_slots=3, max_len=128, prefix_reuse=False)
    off.add(p, SequenceParams(max_tokens=10))
    off.run_until_idle()
    off.add(follow, SequenceParams(max_tokens=8))
    off.run_until_idle()
    assert off.stats.reused_tokens == 0


def test_new_sequences_take_the_lowest_slots(model):
    """A decode step computes every row up to the highest busy slot: a lone sequence after others have come and
    gone decodes in slot 0 (one row), also when its prefix sits in a higher slot (copied down)."""
    ps = prompts((6, 7, 8), seed=14)
    engine = Engine(model, num_slots=4, max_len=64)
    for p in ps:
        engine.add(p, SequenceParams(max_tokens=3))
    engine.run_until_idle()
    follow = ps[2] + [5, 6]
    (sid,) = engine.add(follow, SequenceParams(max_tokens=4))
    events = engine.run_until_idle()
    admitted = {a[0]: a for s in engine.step_log for a in s.get("admitted", [])}
    assert [admitted[i][1] for i in range(3)] == [0, 1, 2]
    assert admitted[sid][1:] == [0, 8]  # slot 0, with the 8 tokens of slot 2's prompt copied
    assert [e.token for e in events if e.token is not None] == alone(model, follow, 4)


def test_cancel_frees_the_slot_at_the_next_step_and_the_queue_is_bounded(model):
    ps = prompts((6, 8, 5), seed=9)
    engine = Engine(model, num_slots=1, max_len=64, max_queue=2)
    (a,) = engine.add(ps[0], SequenceParams(max_tokens=40))
    (b,) = engine.add(ps[1], SequenceParams(max_tokens=5))
    with pytest.raises(QueueFull):
        engine.add(ps[2], SequenceParams(max_tokens=5))
    engine.step()
    engine.step()
    assert engine.cache.used() == 1 and engine.running() == 1 and engine.waiting() == 1
    engine.cancel([a])
    events = engine.step()  # a leaves before anything runs; b takes its slot in the same step
    assert all(e.seq_id != a for e in events)
    assert engine.cache.owner[0] == b
    (c,) = engine.add(ps[2], SequenceParams(max_tokens=5))
    engine.cancel([c])  # cancelled while waiting
    rest = events + engine.run_until_idle()
    assert [e.token for e in rest if e.seq_id == b and e.token is not None] == alone(model, ps[1], 5)
    assert all(e.seq_id != c for e in rest)
    assert engine.cache.used() == 0 and engine.waiting() == 0 and engine.stats.cancelled == 2


def test_stop_ids_and_the_context_end_a_sequence(model):
    (p,) = prompts((10,), seed=10)
    free = alone(model, p, 12)
    stop = free[4]
    engine = Engine(model, num_slots=2, max_len=16)
    (s1,) = engine.add(p, SequenceParams(max_tokens=12, stop_ids=frozenset({stop})))
    (s2,) = engine.add(p, SequenceParams(max_tokens=50))
    events = engine.run_until_idle()
    one = [e for e in events if e.seq_id == s1]
    assert [e.token for e in one[:-1]] == free[: free.index(stop)]
    assert one[-1].token is None and one[-1].finish == "stop" and one[-1].stop_id == stop
    two = [e for e in events if e.seq_id == s2]
    assert len(two) == 6 and two[-1].finish == "length"  # 10 + 6 = the 16 positions of a slot


@pytest.mark.parametrize("every", [4])
def test_stops_detected_on_the_device_and_read_back_every_few_steps(model, every):
    """Picks and finish codes stay device tensors between read-backs: stop ids, max_tokens and the context end
    still end each of several sequences of different lengths where their plain continuation (cut here, by the
    test) says, with the same finish reasons and log-probabilities (to rounding) as reading back every step; tokens picked
    after a stop within a period are never emitted."""
    ps = prompts((10, 4, 7, 12), seed=13)
    max_len = 32
    free = [alone(model, p, max_len - len(p)) for p in ps]  # greedy until the context is full
    stop_a, stop_d = free[0][5], free[3][2]
    params = [
        SequenceParams(max_tokens=30, stop_ids=frozenset({stop_a})),
        SequenceParams(max_tokens=7, logprobs=2),
        SequenceParams(max_tokens=50),  # runs into the end of its 32 positions
        SequenceParams(max_tokens=9, stop_ids=frozenset({stop_d, VOCAB - 1})),
    ]
    want = [
        (free[0][: free[0].index(stop_a)], "stop"),
        (free[1][:7], "length"),
        (free[2][: max_len - len(ps[2])], "length"),
        (free[3][: min(9, free[3].index(stop_d))], "stop" if free[3].index(stop_d) < 9 else "length"),
    ]

    def run(read_back_every):
        engine = Engine(model, num_slots=4, max_len=max_len, read_back_every=read_back_every)
        ids = [engine.add(p, q)[0] for p, q in zip(ps, params)]
        per_step = []
        while engine.busy:
            per_step.append(engine.step())
        events = [e for step in per_step for e in step]
        return engine, ids, events, per_step

    engine, ids, events, per_step = run(every)
    for sid, (tokens, reason) in zip(ids, want):
        mine = [e for e in events if e.seq_id == sid]
        assert [e.token for e in mine if e.token is not None] == tokens
        assert [e.finish for e in mine] == [None] * (len(mine) - 1) + [reason]  # nothing after the end
    assert engine.cache.used() == 0 and not engine.busy
    assert max(sum(e.seq_id == ids[2] for e in step) for step in per_step) == every  # read back in periods
    _, _, each_step, _ = run(1)  # (a period runs finished rows on: other batch shapes, other rounding)
    for sid in ids:
        a, b = ([e for e in evs if e.seq_id == sid] for evs in (events, each_step))
        assert [(e.token, e.finish, e.stop_id) for e in a] == [(e.token, e.finish, e.stop_id) for e in b]
        assert [[t for t, _ in e.top or []] for e in a] == [[t for t, _ in e.top or []] for e in b]
        assert [e.logprob for e in a] == pytest.approx([e.logprob for e in b], abs=1e-5)
    assert any(e.logprob is not None for e in events if e.seq_id == ids[1])
    assert Engine(model, num_slots=1, max_len=8).read_back_every == 1  # CPU default: nothing to overlap


def test_static_decode_buckets_equal_the_eager_step(model):
    """Fixed shapes (batch rounded to a bucket, idle rows, key length rounded up), run eagerly: the GPU path's
    logic without capturing it (test_generate's compiled test runs the same step under torch.compile)."""
    ps = prompts((3, 11, 6), seed=11)
    arrivals = {
        0: [(ps[0], SequenceParams(max_tokens=9))],
        2: [(p, SequenceParams(max_tokens=7)) for p in ps[1:]],
    }
    eager, _ = drive(Engine(model, num_slots=5, max_len=64), arrivals)
    static = Engine(model, num_slots=5, max_len=64, static=True, compile_static=False)
    fixed, _ = drive(static, arrivals)
    assert fixed == eager == [alone(model, p, n) for p, n in ((ps[0], 9), (ps[1], 7), (ps[2], 7))]


def test_logprobs_are_the_model_distribution(model):
    (p,) = prompts((8,), seed=12)
    engine = Engine(model, num_slots=1, max_len=64)
    engine.add(p, SequenceParams(max_tokens=3, logprobs=5))
    events = engine.run_until_idle()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p]))[0, -1].float(), dim=-1)
    first = events[0]
    assert first.token == int(logp.argmax())
    assert first.logprob == pytest.approx(float(logp.max()), abs=1e-4)
    assert [t for t, _ in first.top] == logp.topk(5).indices.tolist()


def test_slot_sizing_from_a_memory_budget():
    per_token = 1000
    assert size_slots(per_token, 4096, memory=None, max_num_seqs=8, max_model_len=None) == (8, 4096)
    assert size_slots(per_token, 4096, memory=8 * 1025 * 1000, max_num_seqs=8, max_model_len=1024) == (
        8,
        1024,
    )
    assert size_slots(per_token, 4096, memory=3 * 1025 * 1000, max_num_seqs=8, max_model_len=1024) == (
        3,
        1024,
    )
    assert size_slots(per_token, 4096, memory=8 * 600 * 1000, max_num_seqs=8, max_model_len=None) == (7, 600)
    with pytest.raises(ValueError, match="does not hold one sequence"):
        size_slots(per_token, 4096, memory=100 * 1000, max_num_seqs=8, max_model_len=1024)
