"""KV layout: what one token's KV looks like, and validation of caller-supplied KV.

The KV of a prefix is a sequence over layers; each layer is a tuple of one or more tensors whose
token axis is dim 0: ``(K, V)`` each ``[tokens, kv_heads, head_dim]`` for MHA/GQA, ``(latent,)``
``[tokens, rank]`` for MLA. A namespace's layout is fixed at its first put.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

import torch

from kvtier.bufpool import MAPPED_BYTES, MappedPool, aligned_empty
from kvtier.errors import InvalidType, LayoutMismatch

KV = Sequence[Sequence[torch.Tensor]]

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8,  # opaque engine pages (block namespaces)
}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise LayoutMismatch(f"unsupported KV dtype {name!r}: expected one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Per-token KV shape: ``num_layers`` layers, each with tensors of ``tensor_shapes``."""

    num_layers: int
    tensor_shapes: tuple[tuple[int, ...], ...]  # per-token shape of each tensor in a layer
    dtype: str

    def __post_init__(self) -> None:
        if self.num_layers <= 0 or not self.tensor_shapes:
            raise LayoutMismatch(f"layout needs >= 1 layer and >= 1 tensor per layer, got {self}")
        if any(d <= 0 for s in self.tensor_shapes for d in s):
            raise LayoutMismatch(f"layout dimensions must be positive, got {self.tensor_shapes}")
        dtype_from_name(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def element_size(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def layer_bytes_per_token(self) -> int:
        return sum(prod(s) for s in self.tensor_shapes) * self.element_size

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.layer_bytes_per_token

    def fingerprint(self) -> str:
        shapes = ";".join("x".join(map(str, s)) for s in self.tensor_shapes)
        return f"L{self.num_layers}|{shapes}|{self.dtype}"

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers,
                "tensor_shapes": [list(s) for s in self.tensor_shapes], "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> KVLayout:
        try:
            return cls(int(d["num_layers"]), tuple(tuple(int(x) for x in s) for s in d["tensor_shapes"]),
                       str(d["dtype"]))
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutMismatch(
                f"malformed layout {d!r}: expected num_layers, tensor_shapes, dtype ({e})") from None

    @classmethod
    def from_kv(cls, kv: KV) -> KVLayout:
        """Infer the layout from a caller's KV (validated for internal consistency)."""
        _check_structure(kv)
        first = kv[0]
        layout = cls(len(kv), tuple(tuple(t.shape[1:]) for t in first), dtype_name(first[0].dtype))
        layout.validate(kv)
        return layout

    def validate(self, kv: KV, n_tokens: int | None = None) -> int:
        """Check ``kv`` matches this layout; return its token count. Raises LayoutMismatch."""
        _check_structure(kv)
        if len(kv) != self.num_layers:
            raise LayoutMismatch(f"kv has {len(kv)} layers, namespace layout has {self.num_layers}")
        tokens = kv[0][0].shape[0] if kv[0][0].dim() else -1
        for i, layer in enumerate(kv):
            if len(layer) != len(self.tensor_shapes):
                raise LayoutMismatch(
                    f"layer {i} has {len(layer)} tensors, layout expects {len(self.tensor_shapes)}")
            for j, (t, shape) in enumerate(zip(layer, self.tensor_shapes, strict=True)):
                if dtype_name(t.dtype) != self.dtype:
                    raise LayoutMismatch(
                        f"layer {i} tensor {j} has dtype {dtype_name(t.dtype)}, layout expects {self.dtype}")
                if t.dim() == 0 or tuple(t.shape[1:]) != shape:
                    raise LayoutMismatch(
                        f"layer {i} tensor {j} has shape {tuple(t.shape)}, expected [tokens, "
                        f"{', '.join(map(str, shape))}]")
                if t.shape[0] != tokens:
                    raise LayoutMismatch(
                        f"layer {i} tensor {j} has {t.shape[0]} tokens, layer 0 has {tokens}")
        if n_tokens is not None and tokens != n_tokens:
            raise LayoutMismatch(f"kv covers {tokens} tokens but token_ids has {n_tokens}")
        return tokens

    def empty(self, n_tokens: int, device: torch.device | str = "cpu", *,
              pool: MappedPool | None = None) -> list[tuple[torch.Tensor, ...]]:
        """Allocate KV tensors for ``n_tokens`` in this layout.

        One allocation (4 KiB-aligned on the host) holds every tensor, layer after layer, so the
        tensors of a block lie at a regular stride: reloading a block into them is one strided
        copy per tensor of a layer (``kvtier.prefixkv``), not one per tensor. A host allocation
        of ``MAPPED_BYTES`` or more comes from ``pool`` where one is given (recycled memory:
        its contents are whatever was there).
        """
        sizes = [n_tokens * prod(s) * self.element_size for s in self.tensor_shapes]
        total = self.num_layers * sum(sizes)
        dev = torch.device(device)
        if dev.type != "cpu":
            buf = torch.empty(total, dtype=torch.uint8, device=dev)
        elif pool is not None and total >= MAPPED_BYTES:
            buf = torch.from_numpy(pool.take(total))
        else:
            buf = aligned_empty(total)
        out, at = [], 0
        for _ in range(self.num_layers):
            layer = []
            for s, n in zip(self.tensor_shapes, sizes, strict=True):
                layer.append(buf[at: at + n].view(self.torch_dtype).view(n_tokens, *s))
                at += n
            out.append(tuple(layer))
        return out


def block_slice(kv: KV, i: int, block_tokens: int) -> list[list[torch.Tensor]]:
    """Views of block ``i``'s tokens (rows ``i*block_tokens`` on) in every tensor of ``kv``."""
    return [[t[i * block_tokens:(i + 1) * block_tokens] for t in layer] for layer in kv]


def _check_structure(kv: KV) -> None:
    if isinstance(kv, torch.Tensor) or not isinstance(kv, Sequence) or len(kv) == 0:
        raise InvalidType(
            f"kv must be a non-empty sequence over layers of tuples of tensors, got {type(kv).__name__}")
    for i, layer in enumerate(kv):
        if isinstance(layer, torch.Tensor) or not isinstance(layer, Sequence) or len(layer) == 0:
            raise InvalidType(f"kv layer {i} must be a non-empty tuple of tensors, got {type(layer).__name__}")
        for j, t in enumerate(layer):
            if not isinstance(t, torch.Tensor):
                raise InvalidType(f"kv layer {i} item {j} must be a torch.Tensor, got {type(t).__name__}")
