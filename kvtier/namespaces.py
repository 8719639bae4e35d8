"""Namespaces: the unit of key isolation (model, KV layout, codec, block size, tenant).

A namespace's layout is fixed at registration or first put. ``kind`` is ``"kv"`` for KV
addressed by token ids, ``"pages"`` for an engine's opaque pages addressed by the engine's own
keys (a *block namespace*: one uint8 "layer" of ``page_bytes`` per block, fingerprinted by the
engine's configuration; see ``kvtier.blocks``). The registry persists to a JSON file
beside the SSD tier's data (written atomically) so a warm restart can decode what it finds.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from kvtier.codecs import normalize_spec
from kvtier.errors import FingerprintMismatch, InvalidRequest, UnknownNamespace
from kvtier.keys import namespace_digest
from kvtier.layout import KVLayout


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    model_id: str
    block_tokens: int
    codec: str
    layout: KVLayout | None = None
    ttl_s: float | None = None
    tenant: str = ""
    kind: str = "kv"  # "kv" (token ids) | "pages" (engine keys)
    fingerprint: str = ""  # pages: the engine configuration, canonical JSON

    @property
    def digest(self) -> bytes:
        if self.layout is None:
            raise InvalidRequest(f"namespace {self.name!r} has no KV layout yet")
        return namespace_digest(self.model_id, self.layout.fingerprint(), self.codec,
                                self.block_tokens, self.tenant, self.name,
                                self.fingerprint if self.kind == "pages" else None)

    @property
    def page_bytes(self) -> int:
        """Bytes of one engine page (block namespaces only)."""
        if self.kind != "pages" or self.layout is None:
            raise InvalidRequest(f"namespace {self.name!r} holds KV by token ids, not engine pages")
        return self.layout.tensor_shapes[0][0]

    def to_dict(self) -> dict:
        d = {"name": self.name, "model_id": self.model_id, "block_tokens": self.block_tokens,
             "codec": self.codec, "layout": self.layout.to_dict() if self.layout else None,
             "ttl_s": self.ttl_s, "tenant": self.tenant, "kind": self.kind}
        if self.kind == "pages":
            d["fingerprint"] = self.fingerprint
            d["page_bytes"] = self.page_bytes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Namespace:
        layout = KVLayout.from_dict(d["layout"]) if d.get("layout") else None
        return cls(d["name"], d["model_id"], int(d["block_tokens"]), d["codec"], layout,
                   d.get("ttl_s"), d.get("tenant", ""), d.get("kind", "kv"), d.get("fingerprint", ""))


def _pages_summary(ns: Namespace) -> str:
    if ns.kind != "pages":
        return f"kind {ns.kind!r} (KV by token ids)"
    return (f"page_bytes {ns.page_bytes}, codec {ns.codec!r}, ttl_s {ns.ttl_s}, "
            f"fingerprint {ns.fingerprint}")


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 256 or any(c in name for c in "\0\n"):
        raise InvalidRequest(f"namespace name must be a non-empty string of <= 256 characters, got {name!r}")
    return name


class NamespaceRegistry:
    """Thread-safe name -> Namespace map, optionally persisted to ``path``."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._path = Path(path) if path else None
        self._lock = threading.Lock()
        self._items: dict[str, Namespace] = {}
        if self._path and self._path.exists():
            try:
                for d in json.loads(self._path.read_text()):
                    ns = Namespace.from_dict(d)
                    self._items[ns.name] = ns
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidRequest(f"namespace registry {self._path} is malformed: {e}") from None

    def get(self, name: str) -> Namespace:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNamespace(f"unknown namespace {name!r}: register it first") from None

    def find(self, name: str) -> Namespace | None:
        return self._items.get(name)

    def all(self) -> list[Namespace]:
        return list(self._items.values())

    def register(self, ns: Namespace) -> Namespace:
        """Add ``ns``; identical re-registration is a no-op, a conflicting one raises."""
        validate_name(ns.name)
        if ns.ttl_s is not None and not (ns.ttl_s > 0):
            raise InvalidRequest(f"ttl_s must be > 0 seconds or null, got {ns.ttl_s!r}")
        if not isinstance(ns.block_tokens, int) or not 1 <= ns.block_tokens <= 1 << 20:
            raise InvalidRequest(f"block_tokens must be an integer in 1..1048576, got {ns.block_tokens!r}")
        ns = replace(ns, codec=normalize_spec(ns.codec))
        with self._lock:
            old = self._items.get(ns.name)
            if old is not None:
                if old == ns or (ns.layout is None and replace(old, layout=None) == ns):
                    return old
                if old.layout is None and replace(ns, layout=None) == old:
                    self._items[ns.name] = ns  # fixing the layout of a layout-less namespace
                    self._save()
                    return ns
                if "pages" in (old.kind, ns.kind):
                    raise FingerprintMismatch(
                        f"block namespace {ns.name!r} is registered for another engine "
                        f"configuration or page size: registered {_pages_summary(old)}, asked "
                        f"{_pages_summary(ns)} (use another name, or drop it first)")
                raise InvalidRequest(
                    f"namespace {ns.name!r} already exists with different settings: "
                    f"{old.to_dict()} (drop it first to change them)")
            self._items[ns.name] = ns
            self._save()
            return ns

    def fix_layout(self, name: str, layout: KVLayout) -> Namespace:
        """Set the layout of a namespace registered without one (its first put); returns the
        namespace as registered (with the layout a concurrent first put may have fixed first).
        Raises UnknownNamespace if it is gone: a put never re-creates a dropped namespace."""
        with self._lock:
            ns = self._items.get(name)
            if ns is None:
                raise UnknownNamespace(f"unknown namespace {name!r}: it was dropped")
            if ns.layout is None:
                ns = self._items[name] = replace(ns, layout=layout)
                self._save()
            return ns

    def remove(self, name: str) -> Namespace:
        with self._lock:
            ns = self._items.pop(name, None)
            if ns is None:
                raise UnknownNamespace(f"unknown namespace {name!r}")
            self._save()
            return ns

    def _save(self) -> None:
        if not self._path:
            return
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps([ns.to_dict() for ns in self._items.values()], indent=1))
        os.replace(tmp, self._path)
