"""Speculative decoding: greedy tokens equal plain greedy decoding of the target exactly (fp32, tiny random models);
sampled tokens follow the target's own sampling distribution (chi-square against exact probabilities), and the
same check fails for deliberately wrong acceptance rules."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from qwen15 import Qwen, get_preset, speculative
from qwen15.errors import UserError
from qwen15.generation import generate, stream_generate
from qwen15.sampling import SamplingParams, probabilities
from qwen15.speculative import (
    DraftModelError,
    SpeculativeCompletion,
    accept_drafts,
    speculative_generate,
    speculative_stream,
)

from conftest import needs_shared

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1000


def tiny(vocab: int, seed: int, **shape) -> Qwen:
    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    cfg = get_preset("tiny-gqa").replace(vocab_size=vocab, bos_token_id=None, eos_token_id=None, **base)
    return Qwen.from_config(cfg.replace(**shape), seed=seed).eval()


def perturbed(model: Qwen, scale: float, seed: int) -> Qwen:
    """A copy of model with noise on every weight: a draft that agrees with it often but not always."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a shared machine a second thread only waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    target = tiny(VOCAB, seed=0)
    return {
        "target": target,
        "other": tiny(
            VOCAB, seed=1, num_hidden_layers=1, hidden_size=32, num_attention_heads=2
        ),  # ~0 accepted
        "close": perturbed(target, 0.002, seed=3),  # 30-80% accepted
        "self": target,  # all accepted
    }


PROMPTS = [[5, 17, 99, 3, 250, 11, 42, 7, 600, 12, 1, 999], [321]]


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("draft", ["other", "close", "self"])
@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_equals_plain_greedy(models, draft, k):
    target = models["target"]
    for prompt in PROMPTS:
        ref = generate(target, None, prompt, max_new_tokens=40, temperature=0, stop_token_ids=[])
        out = speculative_generate(
            target, models[draft], None, prompt, k=k, max_new_tokens=40, temperature=0, stop_token_ids=[]
        )
        assert isinstance(out, SpeculativeCompletion)
        assert out.token_ids == ref.token_ids
        assert (out.finish_reason, out.prompt_tokens) == ("length", len(prompt))
        assert len(out.token_ids) == out.accepted + out.target_forwards  # each round: the kept drafts + 1
        if draft == "self":  # every round makes k + 1 tokens (the last round only what the budget leaves)
            assert out.acceptance_rate == 1.0
            assert out.target_forwards == -(-40 // (k + 1))
        elif draft == "other":
            assert out.acceptance_rate < 0.2
        else:  # kept and rejected drafts: rounds of every length
            assert 0.2 < out.acceptance_rate < 1.0


def test_greedy_with_repetition_penalty_equals_plain(models):
    target = models["target"]
    for k in (1, 3):
        ref = generate(target, None, PROMPTS[0], max_new_tokens=30, repetition_penalty=1.5, stop_token_ids=[])
        out = speculative_generate(
            target,
            models["close"],
            None,
            PROMPTS[0],
            k=k,
            max_new_tokens=30,
            temperature=0,
            repetition_penalty=1.5,
            stop_token_ids=[],
        )
        assert out.token_ids == ref.token_ids
        assert 0 < out.accepted < out.proposed


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 6, 8])
def test_budget_ends_inside_a_round(models, max_new_tokens):
    """k=4 rounds make 5 tokens: budgets that are not multiples of 5 end in the middle of one."""
    target = models["target"]
    ref = generate(target, None, PROMPTS[0], max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=[])
    out = speculative_generate(
        target, target, None, PROMPTS[0], k=4, max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=[]
    )
    assert out.token_ids == ref.token_ids and len(out.token_ids) == max_new_tokens
    assert out.finish_reason == "length"
    assert out.proposed == max_new_tokens - out.target_forwards  # no draft beyond the budget


def test_stop_token_inside_an_accepted_round(models):
    target = models["target"]
    plain = generate(target, None, PROMPTS[0], max_new_tokens=20, temperature=0, stop_token_ids=[]).token_ids
    # a token first seen at a draft after the first of a round past the first (k=4, all kept: rounds of 5)
    index = next(i for i in range(7, 20) if i % 5 not in (0, 4) and plain[i] not in plain[:i])
    stop_id = plain[index]
    ref = generate(target, None, PROMPTS[0], max_new_tokens=20, temperature=0, stop_token_ids=[stop_id])
    out = speculative_generate(
        target, target, None, PROMPTS[0], k=4, max_new_tokens=20, temperature=0, stop_token_ids=[stop_id]
    )
    assert ref.token_ids == plain[:index]
    assert out.token_ids == ref.token_ids
    assert (out.finish_reason, out.stop) == ("stop", stop_id)
    assert out.target_forwards == index // 5 + 1  # no round after the stop
    assert out.accepted == out.proposed  # the round was checked in full, then cut at the stop


@needs_shared
def test_text_stop_strings_and_streaming_equal_plain(tokenizer):
    """Real tokenizer and full-vocabulary tiny models: text, stop string, streamed deltas as plain generate; a
    draft whose embedding has 152064 rows (the 14B+ padding) drafts for a 151936-row target over the tokenizer."""
    target = Qwen.from_config(get_preset("tiny"), seed=0).eval()
    drafts = [
        perturbed(target, 0.002, seed=5),
        Qwen.from_config(get_preset("tiny").replace(vocab_size=152064), seed=6).eval(),
    ]
    prompt = "The capital of France is"
    free = generate(target, tokenizer, prompt, max_new_tokens=24, temperature=0, stop_token_ids=[])
    stop = free.text[len(free.text) // 2 :][:3]
    assert stop.strip(), free.text
    ref = generate(target, tokenizer, prompt, max_new_tokens=24, temperature=0, stop=stop, stop_token_ids=[])
    plain_stream = stream_generate(
        target, tokenizer, prompt, max_new_tokens=24, temperature=0, stop=stop, stop_token_ids=[]
    )
    plain_deltas = list(plain_stream)
    assert ref.finish_reason == "stop" and ref.stop == stop
    for draft in drafts:
        out = speculative_generate(
            target,
            draft,
            tokenizer,
            prompt,
            k=3,
            max_new_tokens=24,
            temperature=0,
            stop=stop,
            stop_token_ids=[],
        )
        assert (out.token_ids, out.text, out.finish_reason, out.stop) == (
            ref.token_ids,
            ref.text,
            ref.finish_reason,
            ref.stop,
        )
        stream = speculative_stream(
            target,
            draft,
            tokenizer,
            prompt,
            k=3,
            max_new_tokens=24,
            temperature=0,
            stop=stop,
            stop_token_ids=[],
        )
        deltas = list(stream)
        assert "".join(deltas) == "".join(plain_deltas) == stream.completion.text == ref.text
        assert stream.completion.proposed > 0
    assert out.acceptance_rate < 0.5  # the unrelated draft


def test_errors_are_user_errors(models):
    target = models["target"]
    wide = tiny(VOCAB + 64, seed=2)
    with pytest.raises(DraftModelError, match=r"1064 rows but the target's 1000") as err:
        speculative_generate(target, wide, None, [1, 2], max_new_tokens=4)
    assert isinstance(err.value, UserError)
    for bad_k in (0, -1, 2.5):
        with pytest.raises(DraftModelError, match="k "):
            speculative_generate(target, target, None, [1, 2], k=bad_k)
    with pytest.raises(UserError, match="empty"):
        speculative_generate(target, target, None, [], max_new_tokens=4)
    with pytest.raises(UserError, match="outside the vocabulary"):
        speculative_generate(target, target, None, [VOCAB], max_new_tokens=4)
    with pytest.raises(UserError, match="max_new_tokens"):
        speculative_generate(target, target, None, [1], max_new_tokens=0)


# ---------------------------------------------------------------------------------------------- sampling


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against exact probabilities; cells expecting < 5 are pooled."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    if not bool(torch.all(obs[~keep] == 0)):
        return 0.0  # a sample where the exact probability is 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2.0), stat / 2))


def always_accept(p, q, drafts, generator=None):
    """Wrong: keeps every draft (the output then follows the draft model)."""
    b, k = drafts.shape
    return torch.full((b,), k), torch.multinomial(p[:, k], 1, generator=generator).squeeze(1)


def resample_from_p(p, q, drafts, generator=None):
    """Wrong: the right acceptance test, but a rejected token is redrawn from p instead of max(0, p - q)."""
    kept, _ = accept_drafts(p, q, drafts, generator)
    at = p.gather(1, kept[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
    return kept, torch.multinomial(at, 1, generator=generator).squeeze(1)


def bonus_from_q(p, q, drafts, generator=None):
    """Wrong: residual at a rejection, but the bonus token after k kept drafts comes from the draft's last q."""
    kept, nxt = accept_drafts(p, q, drafts, generator)
    k = drafts.shape[1]
    wrong = torch.multinomial(q[:, k - 1], 1, generator=generator).squeeze(1)
    return kept, torch.where(kept == k, wrong, nxt)


def test_rejection_step_keeps_the_target_distribution():
    """Synthetic rounds (k=2, 6 tokens, fixed p and q per position, 200k rounds in one batch): the 1st token follows
    p1, the 2nd p2 (rounds that kept draft 1), the bonus p3 (rounds that kept both); wrong rules fail."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 6, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(2, 6, generator=g) * 1.5, -1)
    q[0, 2] = 0.0  # a token the draft never proposes: only the residual can produce it
    q[0] /= q[0].sum()
    b = 200_000

    def tokens(rule):
        gen = torch.Generator().manual_seed(1)
        drafts = torch.stack(
            [torch.multinomial(q[i], b, replacement=True, generator=gen) for i in range(2)], 1
        )
        kept, nxt = rule(p.expand(b, -1, -1), q.expand(b, -1, -1), drafts, gen)
        full = torch.cat([drafts, torch.zeros(b, 1, dtype=torch.long)], 1)
        full[torch.arange(b), kept] = nxt
        return [
            (full[kept >= i, i], p[i]) for i in range(3)
        ]  # position i exists when drafts before it were kept

    def pvalues(rule):
        return [chi2_pvalue(torch.bincount(t, minlength=6), probs) for t, probs in tokens(rule)]

    assert min(pvalues(accept_drafts)) > 1e-3
    for wrong in (always_accept, resample_from_p, bonus_from_q):
        assert min(pvalues(wrong)) < 1e-9, wrong.__name__


SMALL_VOCAB = 8
SETTINGS = dict(temperature=0.8, top_k=6, top_p=0.95, repetition_penalty=1.3)
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def sampling_pair():
    """Target and draft with a vocabulary of 8 and spread-out distributions that differ (total variation ~0.3)."""
    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    target = tiny(SMALL_VOCAB, seed=0, num_key_value_heads=1, **shape)
    target.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return target, perturbed(target, 0.1, seed=1)


def exact_distribution(model: Qwen) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain sampling's exact probabilities under SETTINGS: of the first two tokens [V, V], of the third [V]."""
    params = SamplingParams(**SETTINGS)
    v = SMALL_VOCAB

    def next_probs(prefixes: torch.Tensor) -> torch.Tensor:
        seen = torch.zeros(len(prefixes), v, dtype=torch.bool).scatter_(1, prefixes, True)
        with torch.no_grad():
            return probabilities(model(prefixes)[:, -1], params, seen).double()

    prompt = torch.tensor([PROMPT])
    p1 = next_probs(prompt)[0]
    firsts = torch.cat([prompt.expand(v, -1), torch.arange(v)[:, None]], 1)
    joint12 = p1[:, None] * next_probs(firsts)
    pairs = torch.cat([firsts.repeat_interleave(v, 0), torch.arange(v).repeat(v)[:, None]], 1)
    p3 = (joint12.flatten()[:, None] * next_probs(pairs)).sum(0)
    return joint12, p3


def sampled_counts(target, draft, runs: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    joint12 = torch.zeros(SMALL_VOCAB, SMALL_VOCAB)
    third = torch.zeros(SMALL_VOCAB)
    proposed = accepted = 0
    for seed in range(runs):
        out = speculative_generate(
            target, draft, None, PROMPT, k=2, max_new_tokens=3, stop_token_ids=[], seed=seed, **SETTINGS
        )
        a, b, c = out.token_ids
        joint12[a, b] += 1
        third[c] += 1
        proposed, accepted = proposed + out.proposed, accepted + out.accepted
    return joint12, third, accepted / proposed


def test_sampled_tokens_follow_the_target_distribution(sampling_pair):
    """1500 seeded runs of 3 tokens (k=2: one round of up to 3 tokens, then another if a draft was rejected),
    with temperature, top-k, top-p and repetition penalty; the first two tokens jointly and the third token
    against the target's exact plain-sampling probabilities. The draft's own distribution fails the same test."""
    target, draft = sampling_pair
    exact12, exact3 = exact_distribution(target)
    joint12, third, rate = sampled_counts(target, draft, 1500)
    assert 0.2 < rate < 0.95  # drafts are both kept and rejected
    assert chi2_pvalue(joint12, exact12) > 1e-3
    assert chi2_pvalue(third, exact3) > 1e-3
    draft12, draft3 = exact_distribution(draft)
    assert chi2_pvalue(joint12, draft12) < 1e-9


def test_the_sampling_check_fails_for_an_always_accepting_scheme(sampling_pair, monkeypatch):
    target, draft = sampling_pair
    exact12, _ = exact_distribution(target)
    monkeypatch.setattr(speculative, "accept_drafts", always_accept)
    joint12, _, rate = sampled_counts(target, draft, 300)
    assert rate == 1.0
    assert chi2_pvalue(joint12, exact12) < 1e-9


def test_seeded_sampling_is_reproducible(sampling_pair):
    target, draft = sampling_pair
    runs = [
        speculative_generate(
            target, draft, None, PROMPT, k=3, max_new_tokens=12, seed=7, **SETTINGS
        ).token_ids
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 12


# ---------------------------------------------------------------------------------------------- bench


def test_bench_runs_with_tiny_args(capsys):
    spec = importlib.util.spec_from_file_location("bench_speculative", ROOT / "bench" / "speculative.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--new-tokens", "8", "--repeat", "1", "--k", "1", "3"]) == 0
    out = capsys.readouterr().out
    assert "random weights (acceptance is meaningless)" in out
    assert out.count("| yes |") == 2 and "same greedy tokens: yes" in out


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory, tokenizer):
    """A tiny target and a smaller draft, saved with the real tokenizer; a third folder with a foreign one."""
    from qwen15.model_config import get_preset

    root = tmp_path_factory.mktemp("spec_cli")
    gen = {"eos_token_id": [151645, 151643], "do_sample": False}
    target = Qwen.from_config(get_preset("tiny"), seed=0)
    target.save_pretrained(str(root / "target"), tokenizer=tokenizer, generation_config=gen)
    draft = perturbed(Qwen.from_config(get_preset("tiny"), seed=0), 0.002, seed=1)
    draft.save_pretrained(str(root / "draft"), tokenizer=tokenizer, generation_config=gen)
    return root


def test_cli_generate_and_chat_with_a_draft_print_the_plain_greedy_output(cli_models, capsys):
    """`--draft-model` in generate and chat: the same text as without it (greedy), and the acceptance shown."""
    from qwen15.cli import main

    base = ["--model", str(cli_models / "target"), "--max-new-tokens", "12", "--greedy"]
    draft = ["--draft-model", str(cli_models / "draft"), "--draft-tokens", "3"]
    outputs = {}
    for name, extra in (("plain", []), ("draft", draft)):
        assert main(["generate", *base, "--prompt", "The capital of France is", *extra]) == 0
        got = capsys.readouterr()
        assert main(["chat", *base, "--predict-data", "Hi there", "What is 2 + 2?", *extra]) == 0
        chat = capsys.readouterr()
        outputs[name] = (got.out, chat.out)
        drafted = [e.count("draft tokens accepted") for e in (got.err, chat.err)]
        assert drafted == ([1, 2] if name == "draft" else [0, 0])
    assert outputs["draft"] == outputs["plain"]
    assert outputs["plain"][0].startswith("The capital of France is") and len(outputs["plain"][0]) > 30


def test_cli_refuses_a_draft_it_cannot_use(cli_models, tmp_path, capsys):
    from qwen15.cli import main
    from qwen15.model_config import get_preset

    base = ["generate", "--model", str(cli_models / "target"), "--draft-model", str(cli_models / "draft")]
    assert main([*base, "--prompt", "a", "--prompt", "b"]) == 2
    assert "takes one --prompt" in capsys.readouterr().err
    small = get_preset("tiny").replace(vocab_size=320)  # a model (and tokenizer) of another vocabulary
    Qwen.from_config(small, seed=0).save_pretrained(str(tmp_path / "other"))
    other = ["generate", "--model", str(cli_models / "target"), "--draft-model", str(tmp_path / "other")]
    assert main([*other, "--prompt", "a"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qwen15 generate: error: --draft-model") and "vocabulary" in last
