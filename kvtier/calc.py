"""KV-cache size formulas: bytes per token, bytes for N tokens, tokens that fit in a tier.

Four attention families, each a ``ModelSpec`` with ``attention`` set to:

- ``"gqa"`` (MHA/GQA): ``2 x layers x kv_heads x head_dim x kv_bytes``; layers listed as
  ``"sliding_attention"`` in ``layer_types`` hold only ``min(N, sliding_window)`` tokens.
- ``"mla"``: ``layers x (kv_lora_rank x kv_bytes + qk_rope_head_dim x rope_bytes)``, the cached
  latent; plus ``layers x index_head_dim x indexer_bytes`` with a sparse-attention indexer
  (DeepSeek-V3.2, GLM-5). Layout ``"hf-expanded"`` instead counts what transformers' cache holds:
  the up-projected per-head K and V, ``layers x heads x (qk_nope + qk_rope + v_head_dim) x bytes``.
- ``"hybrid"`` (DeepSeek-V4 CSA/HCA): every layer keeps a ``sliding_window`` of raw K=V entries
  of ``head_dim``; a layer with ratio ``r > 0`` adds ``N // r`` compressed entries, and layers at the
  indexer ratio (4) also an ``index_head_dim`` indexer key per compressed entry.

Sizes are exact integers for N tokens; ``bytes_per_token`` is the marginal cost of one more token
(the per-sequence sliding window excluded), which is what tier capacity is divided by.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from kvtier.errors import InvalidRequest

DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "fp4": 4}
LAYOUTS = ("latent", "hf-expanded")
ATTENTION_LABELS = {"gqa": "MHA/GQA", "mla": "MLA", "mla+indexer": "MLA + indexer",
                    "hybrid": "CSA/HCA hybrid"}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The KV-relevant shape of one model. Fields a family does not use stay 0."""

    name: str
    attention: str  # "gqa" | "mla" | "hybrid"
    num_layers: int
    num_kv_heads: int = 0
    head_dim: int = 0  # per KV head (gqa) or of the shared K=V entry (hybrid)
    num_attention_heads: int = 0  # for the mla "hf-expanded" layout
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    index_head_dim: int = 0  # 0: no sparse-attention indexer
    sliding_window: int = 0
    sliding_layers: int = 0  # gqa: layers that keep only the window
    compress_ratios: tuple[int, ...] = ()  # hybrid: per layer, 0 = window only
    indexer_ratio: int = 4  # hybrid: layers with this ratio carry the indexer
    source: str = ""
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.attention not in ("gqa", "mla", "hybrid"):
            raise InvalidRequest(f"{self.name}: unknown attention family {self.attention!r}")
        if self.num_layers <= 0:
            raise InvalidRequest(f"{self.name}: num_layers must be > 0, got {self.num_layers}")
        if self.attention == "gqa" and (self.num_kv_heads <= 0 or self.head_dim <= 0):
            raise InvalidRequest(f"{self.name}: GQA needs num_kv_heads > 0 and head_dim > 0")
        if self.attention == "mla" and self.kv_lora_rank <= 0:
            raise InvalidRequest(f"{self.name}: MLA needs kv_lora_rank > 0")
        if self.attention == "hybrid" and (len(self.compress_ratios) != self.num_layers
                                           or self.head_dim <= 0 or self.sliding_window <= 0):
            raise InvalidRequest(f"{self.name}: hybrid attention needs one compress ratio per "
                                 f"layer ({self.num_layers}), head_dim and sliding_window")

    @property
    def family(self) -> str:
        if self.attention == "mla" and self.index_head_dim:
            return "mla+indexer"
        return self.attention


@dataclass(frozen=True, slots=True)
class Precision:
    """Storage dtypes: KV, indexer keys, and the RoPE dims of MLA/hybrid entries (None: as KV)."""

    kv: str = "bf16"
    indexer: str = "bf16"
    rope: str | None = None

    def __post_init__(self) -> None:
        for what, d in (("KV", self.kv), ("indexer", self.indexer), ("RoPE", self.rope or self.kv)):
            if d not in DTYPE_BITS:
                raise InvalidRequest(f"unknown {what} dtype {d!r}: expected one of {sorted(DTYPE_BITS)}")

    def bytes(self, which: str) -> Fraction:
        name = {"kv": self.kv, "indexer": self.indexer, "rope": self.rope or self.kv}[which]
        return Fraction(DTYPE_BITS[name], 8)


@dataclass(frozen=True, slots=True)
class KVSize:
    """KV size of one sequence of ``tokens`` tokens; ``*_per_token`` are marginal bytes."""

    model: str
    attention: str
    layout: str
    precision: Precision
    tokens: int
    kv_bytes_per_token: float
    indexer_bytes_per_token: float
    bytes_per_token: float
    window_bytes: int  # per-sequence sliding-window entries at `tokens`
    total_bytes: int

    def tokens_fit(self, capacity_bytes: int) -> int:
        """Tokens whose KV fits in ``capacity_bytes`` (marginal cost; the window is ignored)."""
        return int(capacity_bytes // self.bytes_per_token) if self.bytes_per_token else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["precision"] = asdict(self.precision)
        d["total_gib"] = self.total_bytes / 2**30
        d["total_gb"] = self.total_bytes / 1e9
        return d


def _entry_bytes(spec: ModelSpec, p: Precision, width: int) -> Fraction:
    """One cached row of ``width`` dims whose last ``qk_rope_head_dim`` dims are RoPE."""
    rope = spec.qk_rope_head_dim
    return (width - rope) * p.bytes("kv") + rope * p.bytes("rope")


def kv_size(spec: ModelSpec, tokens: int, precision: Precision | None = None,
            layout: str = "latent") -> KVSize:
    """Bytes of KV one sequence of ``tokens`` tokens takes under ``precision``."""
    p = precision or Precision()
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise InvalidRequest(f"tokens must be a non-negative integer, got {tokens!r}")
    if layout not in LAYOUTS:
        raise InvalidRequest(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    if layout == "hf-expanded" and spec.attention != "mla":
        raise InvalidRequest(f"layout 'hf-expanded' applies to MLA models only; {spec.name} is "
                             f"{ATTENTION_LABELS[spec.family]}")
    kv_tok = idx_tok = Fraction(0)
    window = kv_total = idx_total = Fraction(0)
    if spec.attention == "gqa":
        per_layer = 2 * spec.num_kv_heads * spec.head_dim * p.bytes("kv")
        full = spec.num_layers - spec.sliding_layers
        kv_tok = full * per_layer
        kv_total = kv_tok * tokens
        window = spec.sliding_layers * min(tokens, spec.sliding_window) * per_layer
    elif spec.attention == "mla" and layout == "hf-expanded":
        width = spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim
        kv_tok = spec.num_layers * spec.num_attention_heads * width * p.bytes("kv")
        kv_total = kv_tok * tokens
    elif spec.attention == "mla":
        kv_tok = spec.num_layers * _entry_bytes(spec, p, spec.kv_lora_rank + spec.qk_rope_head_dim)
        idx_tok = spec.num_layers * spec.index_head_dim * p.bytes("indexer")
        kv_total, idx_total = kv_tok * tokens, idx_tok * tokens
    else:
        entry = _entry_bytes(spec, p, spec.head_dim)
        idx_entry = spec.index_head_dim * p.bytes("indexer")
        window = spec.num_layers * min(tokens, spec.sliding_window) * entry
        for r in spec.compress_ratios:
            if r <= 0:
                continue
            kv_tok += entry / r
            kv_total += (tokens // r) * entry
            if r == spec.indexer_ratio:
                idx_tok += idx_entry / r
                idx_total += (tokens // r) * idx_entry
    total = kv_total + idx_total + window
    return KVSize(model=spec.name, attention=spec.family, layout=layout, precision=p, tokens=tokens,
                  kv_bytes_per_token=float(kv_tok), indexer_bytes_per_token=float(idx_tok),
                  bytes_per_token=float(kv_tok + idx_tok), window_bytes=int(-(-window // 1)),
                  total_bytes=int(-(-total // 1)))


_V4 = "DeepSeek-V4 tech report §2.3 and deepseek-ai/{} config.json (compress_ratios, {})"
PRESETS: tuple[ModelSpec, ...] = (
    ModelSpec("Llama-3-8B", "gqa", 32, num_kv_heads=8, head_dim=128,
              source="meta-llama/Meta-Llama-3-8B config.json: 32 layers, 8 KV heads, 4096/32 = 128 head_dim",
              aliases=("meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.1-8B")),
    ModelSpec("Llama-3-70B", "gqa", 80, num_kv_heads=8, head_dim=128,
              source="meta-llama/Meta-Llama-3-70B config.json: 80 layers, 8 KV heads, 8192/64 = 128 head_dim",
              aliases=("meta-llama/Meta-Llama-3-70B", "meta-llama/Llama-3.1-70B")),
    ModelSpec("Qwen3-235B-A22B", "gqa", 94, num_kv_heads=4, head_dim=128,
              source="Qwen/Qwen3-235B-A22B config.json: 94 layers, 4 KV heads, head_dim 128",
              aliases=("Qwen/Qwen3-235B-A22B",)),
    ModelSpec("DeepSeek-V3", "mla", 61, num_attention_heads=128, kv_lora_rank=512,
              qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
              source="deepseek-ai/DeepSeek-V3 config.json: 61 layers, kv_lora_rank 512, qk_rope_head_dim 64",
              aliases=("deepseek-ai/DeepSeek-V3", "DeepSeek-R1", "deepseek-ai/DeepSeek-R1")),
    ModelSpec("DeepSeek-V3.2", "mla", 61, num_attention_heads=128, kv_lora_rank=512,
              qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, index_head_dim=128,
              source="deepseek-ai/DeepSeek-V3.2-Exp config.json: as V3 plus index_head_dim 128 "
                     "(index_n_heads 64, index_topk 2048)",
              aliases=("deepseek-ai/DeepSeek-V3.2", "deepseek-ai/DeepSeek-V3.2-Exp")),
    ModelSpec("GLM-5", "mla", 78, num_attention_heads=64, kv_lora_rank=512, qk_rope_head_dim=64,
              qk_nope_head_dim=192, v_head_dim=256, index_head_dim=128,
              source="zai-org/GLM-5 config.json (transformers GlmMoeDsaConfig): 78 layers, "
                     "kv_lora_rank 512, qk_rope_head_dim 64, index_head_dim 128",
              aliases=("zai-org/GLM-5", "GLM-5.1", "zai-org/GLM-5.1")),
    ModelSpec("Kimi-K2", "mla", 61, num_attention_heads=64, kv_lora_rank=512, qk_rope_head_dim=64,
              qk_nope_head_dim=128, v_head_dim=128,
              source="moonshotai/Kimi-K2-Instruct config.json (DeepSeek-V3 architecture, 64 heads): "
                     "61 layers, kv_lora_rank 512, qk_rope_head_dim 64; the values were read from "
                     "LMCache's modelconfig.json entry for Kimi-K2.6, the same architecture",
              aliases=("moonshotai/Kimi-K2-Instruct", "moonshotai/Kimi-K2-Base")),
    ModelSpec("DeepSeek-V4-Pro", "hybrid", 61, head_dim=512, qk_rope_head_dim=64, sliding_window=128,
              index_head_dim=128, compress_ratios=(128, 128) + (4, 128) * 29 + (4,),
              source=_V4.format("DeepSeek-V4-Pro", "[128, 128, 4, 128, ..., 4] = 30 CSA + 31 HCA; "
                                "head_dim 512, sliding_window 128, index_head_dim 128"),
              aliases=("deepseek-ai/DeepSeek-V4-Pro",)),
    ModelSpec("DeepSeek-V4-Flash", "hybrid", 43, head_dim=512, qk_rope_head_dim=64, sliding_window=128,
              index_head_dim=128, compress_ratios=(0, 0) + (4, 128) * 20 + (4,),
              source=_V4.format("DeepSeek-V4-Flash", "[0, 0, 4, 128, ..., 4] = 2 window-only + 21 CSA "
                                "+ 20 HCA; head_dim 512, sliding_window 128, index_head_dim 128"),
              aliases=("deepseek-ai/DeepSeek-V4-Flash",)),
)


def preset(name: str) -> ModelSpec:
    """The preset called ``name`` (case-insensitive; Hugging Face ids accepted)."""
    key = name.strip().lower()
    for spec in PRESETS:
        if key == spec.name.lower() or key in (a.lower() for a in spec.aliases):
            return spec
    raise InvalidRequest(f"unknown preset {name!r}: expected one of "
                         f"{', '.join(s.name for s in PRESETS)} (or --config a config.json)")


def _int(cfg: dict, key: str, name: str, default: int | None = None) -> int:
    value = cfg.get(key)
    if value is None:
        value = default
    if value is None:
        raise InvalidRequest(f"{name}: config has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{name}: {key!r} must be a non-negative integer, got {value!r}")
    return value


_V4_TYPES = {"sliding_attention": None, "compressed_sparse_attention": 4,
             "heavily_compressed_attention": 128}


def _hybrid_ratios(cfg: dict, layers: int, name: str) -> tuple[int, ...]:
    """Per-layer compress ratios from ``compress_ratios`` (ints) or V4 ``layer_types`` names."""
    if cfg.get("compress_ratios") is not None:
        ratios = cfg["compress_ratios"]
    elif not isinstance(cfg.get("layer_types"), list):
        raise InvalidRequest(f"{name}: DeepSeek-V4 config needs compress_ratios or layer_types")
    else:
        rates = {**_V4_TYPES, **(cfg.get("compress_rates") or {})}
        bad = [t for t in cfg["layer_types"] if t not in _V4_TYPES]
        if bad:
            raise InvalidRequest(f"{name}: unknown DeepSeek-V4 layer type {bad[0]!r}")
        ratios = [rates[t] or 0 for t in cfg["layer_types"]]
    if not isinstance(ratios, list) or not all(isinstance(r, int) and r >= 0 for r in ratios):
        raise InvalidRequest(f"{name}: compress ratios must be a list of non-negative integers")
    if len(ratios) < layers:
        raise InvalidRequest(f"{name}: {len(ratios)} compress ratios for {layers} layers")
    return tuple(ratios[:layers])  # a trailing entry is the MTP layer, not a decoder layer


def spec_from_hf_config(cfg: dict, name: str = "config.json") -> ModelSpec:
    """Detect MHA/GQA, MLA (+indexer) or V4 hybrid attention from a Hugging Face config dict."""
    if not isinstance(cfg, dict):
        raise InvalidRequest(f"{name}: expected a JSON object, got {type(cfg).__name__}")
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal wrappers keep the decoder in text_config
    layers = _int(cfg, "num_hidden_layers", name)
    heads = _int(cfg, "num_attention_heads", name, 0)
    src = f"{name} ({cfg.get('model_type', 'unknown model_type')})"
    layer_types = cfg.get("layer_types") or []
    if not isinstance(layer_types, list):
        raise InvalidRequest(f"{name}: layer_types must be a list, got {layer_types!r}")
    if cfg.get("compress_ratios") is not None or cfg.get("model_type") == "deepseek_v4":
        head_dim = _int(cfg, "head_dim", name)
        rope = cfg.get("qk_rope_head_dim")
        if rope is None:
            rope = int(head_dim * float(cfg.get("partial_rotary_factor") or 0.125))
        csa = (cfg.get("compress_rates") or {}).get("compressed_sparse_attention", 4)
        return ModelSpec(name, "hybrid", layers, head_dim=head_dim, qk_rope_head_dim=rope,
                         sliding_window=_int(cfg, "sliding_window", name),
                         index_head_dim=_int(cfg, "index_head_dim", name, 0),
                         compress_ratios=_hybrid_ratios(cfg, layers, name), indexer_ratio=csa,
                         source=src)
    if cfg.get("kv_lora_rank"):
        return ModelSpec(name, "mla", layers, num_attention_heads=heads,
                         kv_lora_rank=_int(cfg, "kv_lora_rank", name),
                         qk_rope_head_dim=_int(cfg, "qk_rope_head_dim", name),
                         qk_nope_head_dim=_int(cfg, "qk_nope_head_dim", name, 0),
                         v_head_dim=_int(cfg, "v_head_dim", name, 0),
                         index_head_dim=_int(cfg, "index_head_dim", name, 0), source=src)
    if not heads:
        raise InvalidRequest(f"{name}: config has no 'num_attention_heads' (nor kv_lora_rank)")
    kv_heads = _int(cfg, "num_key_value_heads", name, heads) or heads
    head_dim = _int(cfg, "head_dim", name, 0) or _int(cfg, "hidden_size", name) // heads
    unknown = sorted({t for t in layer_types} - {"full_attention", "sliding_attention"})
    if unknown:
        raise InvalidRequest(f"{name}: layer type {unknown[0]!r} is not an attention KV cache "
                             "kvtier calc can count (supported: full_attention, sliding_attention)")
    sliding = sum(t == "sliding_attention" for t in layer_types[:layers])
    window = _int(cfg, "sliding_window", name, 0) if sliding else 0
    if sliding and not window:
        raise InvalidRequest(f"{name}: sliding_attention layers but no sliding_window")
    return ModelSpec(name, "gqa", layers, num_kv_heads=kv_heads, head_dim=head_dim,
                     num_attention_heads=heads, sliding_window=window, sliding_layers=sliding,
                     source=src)


def load_hf_config(path: str | Path) -> ModelSpec:
    """Read a Hugging Face ``config.json`` file; a missing or malformed file is InvalidRequest."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequest(f"config file {str(p)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"cannot read config file {str(p)!r}: {e}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"config file {str(p)!r} is not valid JSON: {e}") from None
    return spec_from_hf_config(cfg, p.name if p.name != "config.json" else str(p))
