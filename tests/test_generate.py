"""Generation: greedy and sampled tokens against transformers' generate, stops, streaming, batching, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qwen15.generation import Completion, GenerationError, Generator, generate, stream_generate
from qwen15.model_config import get_preset
from qwen15.sampling import SamplingParams

from conftest import SHARED_TOKENIZER, load_into_ours, random_hf_model

VOCAB = 1000


def hf_generate(hf, prompts, new_tokens, **kwargs):
    """transformers' generate on left-padded prompts with an attention mask; new tokens per prompt."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        eos_token_id=None,
        **kwargs,
    )
    return out[:, width:].tolist()


@pytest.fixture(scope="module", params=["tiny", "tiny-mha", "tiny-gqa"])
def pair(request):
    cfg = get_preset(request.param).replace(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None)
    hf = random_hf_model(cfg)
    return hf, load_into_ours(hf, cfg)


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_greedy_batch_of_different_lengths_equals_transformers(pair):
    hf, ours = pair
    prompts = random_prompts((5, 17, 1, 30))
    outs = generate(ours, None, prompts, max_new_tokens=64, temperature=0, stop_token_ids=[])
    ref = hf_generate(hf, prompts, 64, do_sample=False)
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" and len(o.token_ids) == 64 for o in outs)
    assert [o.prompt_tokens for o in outs] == [5, 17, 1, 30]


def test_greedy_single_prompt_equals_transformers(pair):
    hf, ours = pair
    (prompt,) = random_prompts((12,), seed=4)
    out = generate(ours, None, prompt, max_new_tokens=64, temperature=0, stop_token_ids=[])
    assert isinstance(out, Completion)
    assert out.token_ids == hf_generate(hf, [prompt], 64, do_sample=False)[0]


def test_greedy_with_repetition_penalty_equals_transformers(pair):
    hf, ours = pair
    (prompt,) = random_prompts((9,), seed=5)
    out = generate(
        ours, None, prompt, max_new_tokens=32, temperature=0, repetition_penalty=1.3, stop_token_ids=[]
    )
    assert out.token_ids == hf_generate(hf, [prompt], 32, do_sample=False, repetition_penalty=1.3)[0]


def test_seeded_sampling_equals_transformers(pair):
    """Same processors, same probabilities, same seed: transformers draws from torch's global generator seeded
    with the same number, so the tokens are identical."""
    hf, ours = pair
    (prompt,) = random_prompts((7,), seed=6)
    settings = dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)
    out = generate(ours, None, prompt, max_new_tokens=32, seed=123, stop_token_ids=[], **settings)
    torch.manual_seed(123)
    ref = hf_generate(hf, [prompt], 32, do_sample=True, **settings)[0]
    assert out.token_ids == ref
    again = generate(ours, None, prompt, max_new_tokens=32, seed=123, stop_token_ids=[], **settings)
    assert again.token_ids == out.token_ids
    other = generate(ours, None, prompt, max_new_tokens=32, seed=124, stop_token_ids=[], **settings)
    assert other.token_ids != out.token_ids


def test_stop_token_ends_each_row_on_its_own(pair):
    hf, ours = pair
    prompts = random_prompts((6, 11))
    free = generate(ours, None, prompts, max_new_tokens=24, temperature=0, stop_token_ids=[])
    stop_id = free[0].token_ids[5]
    first = free[0].token_ids.index(stop_id)
    outs = generate(ours, None, prompts, max_new_tokens=24, temperature=0, stop_token_ids=[stop_id])
    assert outs[0].token_ids == free[0].token_ids[:first]
    assert outs[0].finish_reason == "stop" and outs[0].stop == stop_id
    if stop_id in free[1].token_ids:
        assert outs[1].token_ids == free[1].token_ids[: free[1].token_ids.index(stop_id)]
    else:  # the other row is unaffected and runs to its length
        assert outs[1].token_ids == free[1].token_ids and outs[1].finish_reason == "length"


@pytest.mark.slow
def test_compiled_step_equals_eager():
    """The static-shape step (whole cache, fixed mask) that runs under CUDA graphs on GPU, compiled on CPU; a
    second call of the same shape reuses the cache buffers (stale slots must not leak into the new prompts)."""
    cfg = get_preset("tiny-gqa").replace(vocab_size=VOCAB)
    ours = load_into_ours(random_hf_model(cfg), cfg)
    engine = Generator(ours, None, compile=True)
    greedy = SamplingParams()
    for seed, lengths in ((1, (3, 8)), (2, (9, 2))):
        prompts = random_prompts(lengths, seed=seed)
        eager = generate(
            ours, None, prompts, max_new_tokens=12, temperature=0, stop_token_ids=[], compile=False
        )
        compiled = engine.generate(prompts, max_new_tokens=12, sampling=greedy, stop_token_ids=[])
        assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]


# ---------------------------------------------------------------------------------------------- scripted model


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token sequence per row (whatever the input), to test text handling exactly."""

    def __init__(self, scripts: list[list[int]], vocab: int = 151936):
        super().__init__()
        self.config = get_preset("tiny").replace(vocab_size=vocab)
        self.generation_config = None
        self.scripts = scripts
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompt_lens = None
        self.lm_head = torch.nn.Identity()  # its "hidden states" are the logits already

    def forward(self, input_ids, *, position_ids, last_only, **_):
        """Row i's next token is scripts[i][tokens it has generated], read from its positions (a row's positions
        count its tokens, whatever the cache layout); the same whether hidden states or logits are asked."""
        b = input_ids.shape[0]
        last = position_ids[:, -1]
        if input_ids.shape[1] > 1 or self.prompt_lens is None:  # prefill: each row's prompt ends at `last`
            self.prompt_lens = last + 1
        steps = (last + 1 - self.prompt_lens[:b]).tolist()
        logits = torch.zeros(b, 1, self.config.vocab_size)
        for i in range(b):
            script = self.scripts[i]
            logits[i, 0, script[min(steps[i], len(script) - 1)]] = 1.0
        return logits


@pytest.fixture(scope="module")
def tok():
    if not SHARED_TOKENIZER.is_dir():
        pytest.skip("shared tokenizer absent")
    from qwen15 import Tokenizer

    return Tokenizer.from_pretrained(SHARED_TOKENIZER)


def byte_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte (the byte-level alphabet), so multi-byte characters span several tokens."""
    from qwen15.tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [tok.token_to_id(table[b]) for b in text.encode("utf-8")]


def run_stream(model, tok, **kw):
    stream = stream_generate(model, tok, [1, 2, 3], temperature=0, **kw)
    deltas = list(stream)
    return deltas, stream.completion


def test_stop_string_across_token_boundary(tok):
    ids = tok.encode("Hello world, this is the END of it")
    model = ScriptedModel([ids])
    # "lo wor" spans "Hello" / " world"
    out = generate(
        model, tok, [1, 2, 3], max_new_tokens=40, temperature=0, stop=["lo wor"], stop_token_ids=[]
    )
    assert out.text == "Hel" and out.finish_reason == "stop" and out.stop == "lo wor"
    assert out.token_ids == ids[:2]  # the tokens that completed the stop string are kept in token_ids
    # the earliest of several stop strings wins
    out = generate(
        model, tok, [1, 2, 3], max_new_tokens=40, temperature=0, stop=["END", "is"], stop_token_ids=[]
    )
    assert out.text == "Hello world, th"


def test_stream_deltas_join_to_text_and_hold_back_stop_prefix(tok):
    ids = tok.encode("abc STOP def")
    model = ScriptedModel([ids])
    deltas, done = run_stream(model, tok, max_new_tokens=40, stop=" STOP", stop_token_ids=[])
    assert "".join(deltas) == done.text == "abc"
    assert all("S" not in d for d in deltas)
    # a prefix of a stop string that turns out not to be one is released
    ids = tok.encode("abc STOOL")
    deltas, done = run_stream(
        ScriptedModel([ids]), tok, max_new_tokens=len(ids), stop=" STOP", stop_token_ids=[]
    )
    assert "".join(deltas) == done.text == "abc STOOL" and done.finish_reason == "length"


def test_stream_keeps_multibyte_characters_whole(tok):
    text = "你好，世界！🙂 ok"
    ids = byte_ids(tok, text)
    deltas, done = run_stream(ScriptedModel([ids]), tok, max_new_tokens=len(ids), stop_token_ids=[])
    assert "".join(deltas) == done.text == text == tok.decode(done.token_ids)
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) > 3  # it did stream


def test_stop_id_excluded_and_length_finish(tok):
    ids = tok.encode("one two three") + [tok.im_end_id] + tok.encode(" never")
    model = ScriptedModel([ids, tok.encode(" a b c d e f g h")])
    outs = generate(
        model, tok, [[1, 2, 3], [4, 5]], max_new_tokens=5, temperature=0, stop_token_ids=[tok.im_end_id]
    )
    assert (
        outs[0].text == "one two three" and outs[0].finish_reason == "stop" and outs[0].stop == tok.im_end_id
    )
    assert tok.im_end_id not in outs[0].token_ids
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 5
    assert outs[1].text == tok.decode(outs[1].token_ids)


def test_default_stop_ids_come_from_generation_config(tok):
    ids = tok.encode("hi") + [tok.endoftext_id] + tok.encode("more")
    model = ScriptedModel([ids])
    model.generation_config = {"eos_token_id": [tok.im_end_id, tok.endoftext_id]}
    out = generate(model, tok, [1], max_new_tokens=10, temperature=0)
    assert out.text == "hi" and out.stop == tok.endoftext_id


def test_padding_vocabulary_is_never_generated(tok):
    """A model whose padding rows (ids >= len(tokenizer)) get the highest logits still yields real tokens."""
    cfg = get_preset("tiny-mha")
    from qwen15 import Qwen

    model = Qwen.from_config(cfg, seed=0)
    with torch.no_grad():
        model.lm_head.weight[: len(tok)] *= 0.01
        model.lm_head.weight[len(tok) :] *= 100
    logits = model(torch.tensor([[1, 2, 3]]))[0, -1]
    assert int(logits.argmax()) >= len(tok)  # the unmasked model would pick padding
    for settings in (dict(temperature=0), dict(temperature=1.0, seed=0)):
        out = generate(model, tok, [1, 2, 3], max_new_tokens=8, stop_token_ids=[], **settings)
        assert max(out.token_ids) < len(tok)


def test_bad_requests_are_explained():
    model = ScriptedModel([[5]], vocab=VOCAB)
    with pytest.raises(GenerationError, match="empty"):
        generate(model, None, [[1], []], max_new_tokens=2)
    with pytest.raises(GenerationError, match="context window"):
        generate(model, None, [1] * model.config.max_position_embeddings, max_new_tokens=2)
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(model, None, "text", max_new_tokens=2)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, None, [VOCAB + 5], max_new_tokens=2)


def test_generation_stops_at_context_window():
    model = ScriptedModel([[7]], vocab=VOCAB)
    model.config = model.config.replace(max_position_embeddings=16)
    out = Generator(model, None).generate(
        [[1] * 10], max_new_tokens=50, sampling=SamplingParams(), stop_token_ids=[]
    )
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 6


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    from qwen15 import Qwen

    path = tmp_path_factory.mktemp("tiny") / "model"
    Qwen.from_config(get_preset("tiny"), seed=0).save_pretrained(
        str(path), tokenizer=tok, generation_config={"eos_token_id": [151645, 151643], "do_sample": False}
    )
    return path


def test_cli_generate_batches_prompts_and_matches_library(tiny_dir, tok):
    from qwen15 import Qwen

    prompts = ["Hello", "The capital of France is a city"]
    proc = subprocess.run(
        [sys.executable, "-m", "qwen15.cli", "generate", "--model", str(tiny_dir), "--max-new-tokens", "6"]
        + [a for p in prompts for a in ("--prompt", p)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    model = Qwen.from_pretrained(str(tiny_dir))
    outs = generate(model, tok, prompts, max_new_tokens=6)
    for p, o in zip(prompts, outs):
        assert p + o.text in proc.stdout
    assert "tokens/s" in proc.stderr


def test_cli_generate_bf16_int8_and_stream(tiny_dir, tok):
    from qwen15 import Qwen

    base = [sys.executable, "-m", "qwen15.cli", "generate", "--model", str(tiny_dir), "--max-new-tokens", "5"]
    bf16 = subprocess.run(
        base + ["--prompt", "Hi", "--dtype", "bf16"], capture_output=True, text=True, timeout=300
    )
    assert bf16.returncode == 0, bf16.stderr
    assert "oneDNN-packed" in bf16.stderr or "bfloat16" in bf16.stderr
    model = Qwen.from_pretrained(str(tiny_dir), dtype=torch.bfloat16)
    assert "Hi" + generate(model, tok, "Hi", max_new_tokens=5).text in bf16.stdout
    sampled = ["--temperature", "0.9", "--top-k", "40", "--seed", "7"]
    q = subprocess.run(
        base + ["--prompt", "Hi", "--quantize", "int8", *sampled], capture_output=True, text=True, timeout=300
    )
    assert q.returncode == 0 and "int8 weights" in q.stderr, q.stderr
    from qwen15.quantize import quantize_int8

    int8 = quantize_int8(
        Qwen.from_pretrained(str(tiny_dir))
    )  # the library, as documented (CPU: fp32 activations)
    want = generate(int8, tok, ["Hi"], max_new_tokens=5, temperature=0.9, top_k=40, seed=7)[0]
    assert q.stdout == "Hi" + want.text + "\n"
    streamed = subprocess.run(
        base + ["--prompt", "Hi", "--stream"], capture_output=True, text=True, timeout=300
    )
    model = Qwen.from_pretrained(str(tiny_dir))
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "Hi" + generate(model, tok, "Hi", max_new_tokens=5).text + "\n"


def test_cli_generate_bad_model_folder_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qwen15.cli", "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no such model folder" in proc.stderr


def test_saved_generation_config_roundtrip(tiny_dir):
    gc = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gc["eos_token_id"] == [151645, 151643]


def test_public_api_exports_the_functions():
    """`from qwen15 import generate` is the function (not a submodule of the same name)."""
    import qwen15.generation  # noqa: F401  (importing the engine first must not change what the package exports)
    from qwen15 import generate as exported
    from qwen15 import stream_generate as exported_stream

    assert exported is generate and exported_stream is stream_generate
