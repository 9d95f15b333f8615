import json

import pytest

from qwen15.model_config import PRESETS, ConfigError, ModelConfig, get_preset

# Parameter counts published for the Qwen1.5 shapes (QWEN15.md), in billions, two decimals.
PUBLISHED_BILLIONS = {
    "qwen1.5-0.5b": "0.46",
    "qwen1.5-1.8b": "1.84",
    "qwen1.5-4b": "3.95",
    "qwen1.5-7b": "7.72",
    "qwen1.5-14b": "14.17",
    "qwen1.5-32b": "32.51",
    "qwen1.5-72b": "72.29",
    "qwen1.5-110b": "111.2",
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_preset_parameter_counts(name):
    published = PUBLISHED_BILLIONS[name]
    decimals = len(published.split(".")[1])
    assert round(get_preset(name).num_params() / 1e9, decimals) == float(published)


def test_num_params_matches_model():
    from qwen15 import Qwen

    for name in ("tiny", "tiny-mha", "tiny-gqa"):
        cfg = get_preset(name).replace(vocab_size=1000)
        assert Qwen(cfg).num_params() == cfg.num_params()


def test_presets_include_gqa_and_tied():
    assert get_preset("qwen1.5-32b").num_key_value_heads == 8
    assert get_preset("qwen1.5-0.5b").tie_word_embeddings
    assert get_preset("qwen1.5-0.5b").head_dim == 64
    assert get_preset("qwen1.5-7b").head_dim == 128
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("qwen1.5-3b")
    assert set(PRESETS) >= {f"qwen1.5-{s}" for s in ("0.5b", "1.8b", "4b", "7b", "14b", "32b", "72b", "110b")}


def test_hf_dict_round_trip_and_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = get_preset("qwen1.5-32b")
    again = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.num_key_value_heads == 8 and hf.intermediate_size == 27392
    theta = hf.rope_parameters["rope_theta"] if hasattr(hf, "rope_parameters") else hf.rope_theta
    assert theta == 1e6


def test_reads_transformers_v5_config():
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5e6,
    )
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    assert cfg.rope_theta == 5e6 and cfg.num_key_value_heads == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 129}, "not divisible by num_attention_heads"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope scaling"),
        ({"frobnicate": 1}, "unknown key.*frobnicate"),
        ({"model_type": "llama"}, "model_type"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ],
)
def test_bad_config_is_refused_clearly(tmp_path, change, message):
    data = get_preset("tiny").to_hf_dict()
    data.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as err:
        ModelConfig.from_json_file(path)
    assert str(path) in str(err.value)


def test_malformed_config_names_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 64,\n  "oops"\n}')
    with pytest.raises(ConfigError, match=r"config\.json:\d+:\d+: malformed JSON"):
        ModelConfig.from_json_file(path)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json_file(tmp_path / "nope.json")
