"""kvtier.calc: the published size comparison, and formulas checked against real transformers caches.

The transformers checks build small models of the same attention geometry as a preset (same heads,
head dims, latent and indexer widths; 2 layers, tiny hidden size, random weights), run a short
prefill, and count the bytes the model really holds per token per layer; the preset's figure must
equal that count times its layer count.
"""

from __future__ import annotations

import json

import pytest
import torch

from kvtier.calc import (
    PRESETS,
    ModelSpec,
    Precision,
    kv_size,
    load_hf_config,
    preset,
    spec_from_hf_config,
)
from kvtier.errors import InvalidRequest

FP8_KV_BF16_INDEXER = Precision(kv="fp8", indexer="bf16")
PREFILL = 7


# ---- acceptance 1: the published comparison -------------------------------------------------

@pytest.mark.parametrize(("name", "gib"), [
    ("DeepSeek-V4-Pro", 5.48), ("GLM-5", 60.4), ("Qwen3-235B-A22B", 89.6),
])
def test_published_comparison_at_one_million_tokens(name, gib):
    size = kv_size(preset(name), 1_000_000, FP8_KV_BF16_INDEXER)
    assert size.total_bytes / 2**30 == pytest.approx(gib, rel=0.01)


def test_deepseek_v3_is_70272_bytes_per_token_in_bf16():
    size = kv_size(preset("DeepSeek-V3"), 1, Precision(kv="bf16"))
    assert size.bytes_per_token == 70_272
    assert size.total_bytes == 70_272


@pytest.mark.parametrize(("name", "bf16_bytes"), [
    ("Llama-3-8B", 131_072), ("Llama-3-70B", 327_680), ("Qwen3-235B-A22B", 192_512),
    ("Kimi-K2", 70_272),
])
def test_bf16_bytes_per_token_of_gqa_and_mla_presets(name, bf16_bytes):
    assert kv_size(preset(name), 1).bytes_per_token == bf16_bytes


def test_v4_is_an_order_of_magnitude_below_v32_and_flash_below_pro():
    p = FP8_KV_BF16_INDEXER
    pro, flash, v32 = (kv_size(preset(n), 1_000_000, p).total_bytes
                       for n in ("DeepSeek-V4-Pro", "DeepSeek-V4-Flash", "DeepSeek-V3.2"))
    assert flash < pro < v32 / 5


def test_every_preset_names_its_source_and_resolves_by_hf_id():
    for spec in PRESETS:
        assert spec.source
        assert preset(spec.name.upper()) is spec
        for alias in spec.aliases:
            assert preset(alias) is spec


# ---- acceptance 1: per-token bytes against real transformers models ------------------------

def _tensor_bytes(*tensors: torch.Tensor) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def test_gqa_preset_matches_llama_dynamic_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = preset("Llama-3-8B")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=spec.num_kv_heads * 2, num_key_value_heads=spec.num_kv_heads,
                      head_dim=spec.head_dim)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 128, (1, PREFILL)), use_cache=True).past_key_values
    measured = sum(_tensor_bytes(layer.keys, layer.values) for layer in cache.layers)
    per_token_per_layer = measured / PREFILL / cfg.num_hidden_layers
    assert per_token_per_layer * spec.num_layers == kv_size(spec, 1, Precision("bf16")).bytes_per_token
    # and the config.json path: the small model's own config gives the small model's cache
    small = spec_from_hf_config(cfg.to_dict(), "tiny-llama")
    assert kv_size(small, PREFILL, Precision("bf16")).total_bytes == measured


def _deepseek_kwargs(spec: ModelSpec) -> dict:
    return dict(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                kv_lora_rank=spec.kv_lora_rank, qk_rope_head_dim=spec.qk_rope_head_dim,
                qk_nope_head_dim=16, v_head_dim=24, first_k_dense_replace=2, n_routed_experts=4,
                num_experts_per_tok=2, n_group=1, topk_group=1)


def test_mla_preset_matches_deepseek_v3_latent_and_cache():
    """Compared: the kv_a_proj_with_mqa output (latent + decoupled RoPE key) and the cache."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    spec = preset("DeepSeek-V3")
    torch.manual_seed(0)
    cfg = DeepseekV3Config(**_deepseek_kwargs(spec))
    model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).eval()
    latents: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(lambda m, i, o: latents.append(o))
    with torch.no_grad():
        cache = model(torch.randint(0, 128, (1, PREFILL)), use_cache=True).past_key_values
    want = kv_size(spec, 1, Precision("bf16")).bytes_per_token
    produced = sum(_tensor_bytes(t) for t in latents)
    assert produced / PREFILL / 2 * spec.num_layers == want
    # transformers 5.x caches that same latent (kv_nope: kv_lora_rank, k_rot: qk_rope_head_dim)
    cached = sum(_tensor_bytes(layer.keys, layer.values) for layer in cache.layers)
    assert cached / PREFILL / 2 * spec.num_layers == want


def test_mla_hf_expanded_layout_matches_the_per_head_kv_transformers_materialises():
    """``hf-expanded`` counts the up-projected per-head K and V (what older transformers cached)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(**_deepseek_kwargs(preset("DeepSeek-V3")))
    model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).eval()
    expanded: list[torch.Tensor] = []
    for layer in model.model.layers:
        attn = layer.self_attn

        def expand(kv_nope, k_rot, _orig=attn.expand_kv):
            k, v = _orig(kv_nope, k_rot)
            expanded.extend((k, v))
            return k, v
        attn.expand_kv = expand
    with torch.no_grad():
        model(torch.randint(0, 128, (1, PREFILL)), use_cache=True)
    small = spec_from_hf_config(cfg.to_dict(), "tiny-deepseek-v3")
    got = kv_size(small, PREFILL, Precision("bf16"), layout="hf-expanded").total_bytes
    assert got == sum(_tensor_bytes(t) for t in expanded)
    v3 = preset("DeepSeek-V3")  # 128 heads x (128 + 64 + 128) per layer instead of 576: ~71x
    assert kv_size(v3, 1, layout="hf-expanded").bytes_per_token == 61 * 128 * 320 * 2


def test_mla_indexer_preset_matches_deepseek_v32_cache():
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    spec = preset("DeepSeek-V3.2")
    torch.manual_seed(0)
    cfg = DeepseekV32Config(**_deepseek_kwargs(spec), index_head_dim=spec.index_head_dim,
                            index_n_heads=2, index_topk=4)
    model = DeepseekV32ForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 128, (1, PREFILL)), use_cache=True).past_key_values
    latent = sum(_tensor_bytes(layer.keys, layer.values) for layer in cache.layers)
    indexer = sum(_tensor_bytes(layer.indexer_keys) for layer in cache.layers)
    size = kv_size(spec, 1, Precision("bf16", indexer="bf16"))
    assert latent / PREFILL / 2 * spec.num_layers == size.kv_bytes_per_token
    assert indexer / PREFILL / 2 * spec.num_layers == size.indexer_bytes_per_token
    small = spec_from_hf_config(cfg.to_dict(), "tiny-deepseek-v32")
    assert small.family == "mla+indexer"
    assert kv_size(small, PREFILL).total_bytes == latent + indexer


def test_hybrid_formula_matches_deepseek_v4_compressed_cache():
    """Compared: compressed KV and indexer entries exactly; the raw window to within one token
    (transformers keeps ``sliding_window - 1`` raw tokens between steps, the formula a full window).
    V4 is shared-KV MQA (K = V), so the window is counted once, from ``keys``."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV4Config(
        vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, head_dim=64, q_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2,
        sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=32, index_topk=4,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        layer_types=["sliding_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention", "heavily_compressed_attention"])
    model = DeepseekV4ForCausalLM(cfg).eval()
    tokens = 37
    with torch.no_grad():
        cache = model(torch.randint(0, 128, (1, tokens)), use_cache=True).past_key_values
    compressed = indexer = window = 0
    for layer in cache.layers:
        window += _tensor_bytes(layer.keys)
        kv = getattr(layer, "compressed_kv", {})
        compressed += _tensor_bytes(kv.get("compressor"))
        indexer += _tensor_bytes(kv.get("indexer"))
    spec = spec_from_hf_config(cfg.to_dict(), "tiny-deepseek-v4")
    assert spec.attention == "hybrid" and spec.compress_ratios == (0, 16, 4, 16)
    size = kv_size(spec, tokens, Precision("fp32", indexer="fp32"))
    assert indexer == (tokens // 4) * 32 * 4
    assert size.total_bytes - size.window_bytes == compressed + indexer
    raw_row = spec.head_dim * 4
    assert size.window_bytes - window == cfg.num_hidden_layers * raw_row


# ---- config.json detection ------------------------------------------------------------------

def _pro_config() -> dict:
    ratios = [128, 128] + [4, 128] * 29 + [4, 0]  # the shipped list ends with the MTP layer's 0
    return {"model_type": "deepseek_v4", "num_hidden_layers": 61, "num_attention_heads": 128,
            "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "sliding_window": 128,
            "index_head_dim": 128, "index_n_heads": 64, "compress_ratios": ratios}


def test_v4_config_json_gives_the_preset_figure(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_pro_config()))
    spec = load_hf_config(path)
    p = FP8_KV_BF16_INDEXER
    assert kv_size(spec, 10**6, p).total_bytes == kv_size(preset("DeepSeek-V4-Pro"), 10**6, p).total_bytes


def test_gqa_config_detection_uses_head_dim_or_hidden_over_heads():
    base = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512}
    assert spec_from_hf_config(base).head_dim == 64
    assert spec_from_hf_config(base).num_kv_heads == 8  # MHA when num_key_value_heads is absent
    assert spec_from_hf_config({**base, "head_dim": 128, "num_key_value_heads": 2}).head_dim == 128


def test_sliding_layers_hold_only_the_window():
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
           "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}
    size = kv_size(spec_from_hf_config(cfg), 100, Precision("fp32"))
    row = 2 * 1 * 8 * 4
    assert size.bytes_per_token == row
    assert size.total_bytes == 100 * row + 4 * row


@pytest.mark.parametrize(("cfg", "needle"), [
    ({"num_attention_heads": 8}, "num_hidden_layers"),
    ({"num_hidden_layers": 2}, "num_attention_heads"),
    ({"num_hidden_layers": 2, "kv_lora_rank": 512}, "qk_rope_head_dim"),
    ({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 64,
      "layer_types": ["linear_attention", "full_attention"]}, "linear_attention"),
    ({"num_hidden_layers": "two", "num_attention_heads": 8}, "num_hidden_layers"),
    ({**_pro_config(), "compress_ratios": [4, 128]}, "compress ratios"),
    ({"model_type": "deepseek_v4", "num_hidden_layers": 2, "head_dim": 64, "sliding_window": 8},
     "compress_ratios or layer_types"),
    ({"num_hidden_layers": 2, "num_attention_heads": 8, "head_dim": 1.5}, "head_dim"),
    ([1, 2], "JSON object"),
])
def test_bad_configs_are_rejected_naming_the_problem(cfg, needle):
    with pytest.raises(InvalidRequest, match=needle):
        spec_from_hf_config(cfg, "bad.json")


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(InvalidRequest, match="not found"):
        load_hf_config(tmp_path / "absent.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        load_hf_config(bad)


# ---- precision, layouts, tiers --------------------------------------------------------------

def test_rope_and_indexer_dtypes_are_separate():
    v32 = preset("DeepSeek-V3.2")
    size = kv_size(v32, 1, Precision(kv="fp8", indexer="fp4", rope="bf16"))
    assert size.kv_bytes_per_token == 61 * (512 * 1 + 64 * 2)
    assert size.indexer_bytes_per_token == 61 * 128 * 0.5


def test_tokens_fit_is_the_largest_count_within_capacity():
    size = kv_size(preset("GLM-5"), 1, FP8_KV_BF16_INDEXER)
    for capacity in (0, 1, 64 * 2**30, 2 * 2**40 + 12345):
        n = size.tokens_fit(capacity)
        assert n * size.bytes_per_token <= capacity < (n + 1) * size.bytes_per_token


def test_bad_inputs_raise_invalid_request():
    with pytest.raises(InvalidRequest, match="unknown preset 'GPT-9'"):
        preset("GPT-9")
    with pytest.raises(InvalidRequest, match="KV dtype 'int3'"):
        Precision(kv="int3")
    with pytest.raises(InvalidRequest, match="tokens"):
        kv_size(preset("GLM-5"), -1)
    with pytest.raises(InvalidRequest, match="MLA models only"):
        kv_size(preset("Llama-3-8B"), 1, layout="hf-expanded")
