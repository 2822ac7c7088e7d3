"""Logits equal transformers' own implementation, both ways through save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from pipeline.errors import PipelineError
from pipeline.models import ModelConfig, build_model, from_pretrained, load_weights, preset

TOL = 1e-4

CONFIGS = {
    "gpt2": lambda: preset("gpt2-tiny"),
    "llama": lambda: preset("llama-tiny"),
    "llama-bias-tied": lambda: preset("llama-tiny", qkv_bias=True, o_bias=True, tie_word_embeddings=True),
    "qwen2": lambda: preset("llama-tiny", hf_model_type="qwen2", qkv_bias=True, rope_theta=1e6),
    "llama3-rope": lambda: preset("llama-tiny", rope_scaling=dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)),
    "qwen3": lambda: preset("qwen3-tiny"),
    "qwen3-untied": lambda: preset("qwen3-tiny", tie_word_embeddings=False),
}


def _hf_model(config: ModelConfig, seed: int = 0):
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    _randomize(model)
    return model.eval()


def _randomize(model):
    """Every weight random (biases and norm scales are tested too); norm scales near 1 so
    attention is sharp enough for position errors to show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.dim() == 1 and name.endswith("weight") and ("norm" in name or ".ln" in name)
            p.normal_(1.0 if is_norm else 0.0, 0.1)


def _ids(seed=0, b=2, t=64, vocab=256):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_save_then_our_load(name, tmp_path):
    config = CONFIGS[name]()
    hf = _hf_model(config)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    assert ours.config.hf_model_type == config.hf_model_type
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(ids).logits) <= TOL
        if config.family == "llama":  # explicit, non-contiguous position ids
            pos = torch.arange(64).unsqueeze(0).repeat(2, 1) * 3 + torch.tensor([[5], [0]])
            ref = hf(ids, position_ids=pos).logits
            assert _max_diff(ours(ids, position_ids=pos).logits, ref) <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_our_save_then_transformers_load(name, tmp_path):
    config = CONFIGS[name]()
    torch.manual_seed(1)
    ours = build_model(config).eval()
    _randomize(ours)
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    ids = _ids(seed=3)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(ids).logits) <= TOL
    # and back: our load of our save is exact
    again = from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)


def test_sharded_checkpoint(tmp_path):
    hf = _hf_model(preset("qwen3-tiny"))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(ids).logits) <= TOL


def test_wrong_family_names_the_tensor(tmp_path):
    build_model(preset("qwen3-tiny")).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()  # no config to catch it: the tensor names must
    with pytest.raises(PipelineError, match=r"'transformer\.wte\.weight'|'model\.embed_tokens\.weight'"):
        load_weights(build_model(preset("gpt2-tiny")), tmp_path)


def test_wrong_family_by_config(tmp_path):
    build_model(preset("qwen3-tiny")).save_pretrained(tmp_path)
    with pytest.raises(PipelineError, match="'qwen3' does not fit a gpt2 model"):
        load_weights(build_model(preset("gpt2-tiny")), tmp_path)


def test_wrong_shape_names_the_tensor(tmp_path):
    build_model(preset("llama-tiny", d_ff=96)).save_pretrained(tmp_path)
    with pytest.raises(PipelineError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(96, 64\)"):
        load_weights(build_model(preset("llama-tiny")), tmp_path)


def test_pickles_are_not_loaded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset("gpt2-tiny").to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PipelineError, match="pickled weights are not loaded"):
        from_pretrained(tmp_path)


def test_unsupported_config_is_an_error():
    with pytest.raises(PipelineError, match="model_type 'mistral'"):
        ModelConfig.from_hf({"model_type": "mistral"})
    with pytest.raises(PipelineError, match="divisible"):
        ModelConfig(family="gpt2", vocab_size=10, n_layer=1, n_head=3, d_model=64)
    with pytest.raises(PipelineError, match="unknown model preset"):
        preset("gpt5")


@pytest.mark.parametrize("name", ["gpt2-124m", "qwen3-0.6b"])
def test_public_presets_match_transformers_defaults(name):
    """The public-checkpoint presets are valid HF configs with the published sizes."""
    config = preset(name)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    assert ModelConfig.from_hf(hf_config.to_dict()) == config
    with torch.device("meta"):
        n = build_model(config).num_params()
    assert abs(n - {"gpt2-124m": 124.44e6, "qwen3-0.6b": 596.05e6}[name]) < 0.01e6


def test_public_gpt2_layout(tmp_path):
    """The public gpt2 checkpoint was saved from GPT2Model: no 'transformer.' prefix, old mask buffers."""
    from safetensors.torch import load_file, save_file

    ours = build_model(preset("gpt2-tiny")).eval()
    _randomize(ours)
    ours.save_pretrained(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
    save_file(tensors, tmp_path / "model.safetensors")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path)(ids).logits, ours(ids).logits)
