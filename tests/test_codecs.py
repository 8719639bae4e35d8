import pytest
import torch

from kvtier.codecs import available_codecs, get_codec, normalize_spec
from kvtier.errors import InvalidRequest

# Documented error bounds (README, "Codecs"): relative RMS error of KV after a round trip.
BOUNDS = {"none": 0.0, "fp8": 0.05, "int8": 0.01}


def real_kv(tiny_llama, tokens=256):
    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pkv = tiny_llama(ids, use_cache=True).past_key_values
    from kvtier.integrations.transformers import dynamic_cache_to_kv

    return [tuple(t.contiguous() for t in layer) for layer in dynamic_cache_to_kv(pkv)]


def roundtrip(codec, tensors):
    data = codec.encode(tensors)
    outs = [torch.empty_like(t) for t in tensors]
    codec.decode_into(torch.frombuffer(bytearray(data), dtype=torch.uint8), outs)
    return outs, len(data)


def rel_rms(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / a.float().pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("spec", available_codecs())
def test_roundtrip_within_documented_bound(spec, tiny_llama):
    codec = get_codec(spec)
    bound = BOUNDS[spec.split("+")[0]]
    for layer in real_kv(tiny_llama):
        outs, _ = roundtrip(codec, layer)
        for a, b in zip(layer, outs, strict=True):
            err = rel_rms(a, b)
            assert err <= bound, f"{spec}: relative RMS error {err:.4f} > {bound}"
            if bound == 0.0:
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["none", "fp8", "int8", "int8+zstd"])
def test_dtypes_and_mla_shapes(spec, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(32, 4, 16, generator=g).to(dtype), torch.randn(32, 48, generator=g).to(dtype)]
    outs, size = roundtrip(get_codec(spec), tensors)
    for a, b in zip(tensors, outs, strict=True):
        assert b.dtype == dtype and b.shape == a.shape
        assert rel_rms(a, b) <= BOUNDS[spec.split("+")[0]] + (0.01 if dtype != torch.float32 else 0)
    if spec.startswith(("fp8", "int8")):
        assert size < sum(t.numel() * t.element_size() for t in tensors)


def test_zstd_is_lossless_and_shrinks_redundant_data():
    t = [torch.zeros(256, 2, 64)]
    outs, size = roundtrip(get_codec("zstd"), t)
    assert torch.equal(outs[0], t[0])
    assert size < t[0].numel() * 4 / 50


def test_outlier_head_does_not_crush_others():
    x = torch.randn(64, 4, 32)
    x[:, 0] *= 1000  # one head with huge values: per-head scales keep the others precise
    outs, _ = roundtrip(get_codec("fp8"), [x])
    assert rel_rms(x[:, 1:], outs[0][:, 1:]) < 0.05


@pytest.mark.parametrize("bad", ["gzip", "fp8+fp8", "", "none+zstd+zstd", 3])
def test_unknown_codec(bad):
    with pytest.raises(InvalidRequest, match="codec"):
        get_codec(bad)


def test_spec_normalisation():
    assert normalize_spec("ZSTD") == "none+zstd"
    assert normalize_spec("fp8+zstd") == "fp8+zstd"
