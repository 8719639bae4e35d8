"""Namespaces: the unit of key isolation (model, KV layout, codec, block size, tenant).

A namespace's layout is fixed at registration or first put. ``kind`` is ``"kv"`` for KV
addressed by token ids, ``"pages"`` for an engine's opaque pages addressed by the engine's own
keys (a *block namespace*, fingerprinted by the engine's configuration; see ``kvtier.blocks``).
The registry persists beside the SSD tier's data so a warm restart can find the blocks it holds (a block's key is derived from its
namespace's settings: without the entry, the blocks are unreachable until the namespace is
registered again with the same settings).

Persistence is crash-safe and checked on open (see ``RegistryFile``): two copies, each written to
a new file, fsync'd, renamed over the old one, the directory fsync'd; each entry carries its own
crc32c. A damaged copy is logged and counted and what the other copy (or the undamaged entries)
hold is recovered; the cache always opens.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import crc32c

from kvtier.codecs import normalize_spec
from kvtier.errors import (
    FingerprintMismatch,
    InvalidRequest,
    KVTierError,
    StorageFull,
    UnknownNamespace,
)
from kvtier.keys import namespace_digest
from kvtier.layout import KVLayout

log = logging.getLogger(__name__)
FILE_FORMAT = "kvtier-namespaces"


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


@dataclass(slots=True)
class _Copy:
    """What one copy of the registry file held: its valid entries and what was wrong."""

    items: dict[str, Namespace] = field(default_factory=dict)
    exists: bool = False
    problems: list[str] = field(default_factory=list)


class RegistryFile:
    """The registry on disk: ``path`` and its twin ``path.bak``, both always written whole.

    ``save`` writes each copy crash-safely (new file, fsync, rename over, fsync the directory),
    the main one first, so at any moment at least one copy holds the latest or the previous
    state. ``load`` takes the main copy when it is intact; otherwise the union of the valid
    entries of both (the main copy's win), reporting what it found in ``problems``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backup = path.with_name(path.name + ".bak")
        self.problems: list[str] = []

    def load(self) -> dict[str, Namespace]:
        main = self._read(self.path)
        if main.exists and not main.problems:
            return main.items
        spare = self._read(self.backup)
        items = {**spare.items, **main.items}
        self.problems = main.problems + spare.problems
        if not main.exists and spare.exists:
            self.problems.append(f"{self.path.name} is missing")
        if self.problems:
            log.error("namespace registry %s damaged (%s); %d namespaces recovered from the valid "
                      "entries of %s and %s; blocks of any namespace lost here are unreachable until "
                      "it is registered again with the same settings", self.path,
                      "; ".join(self.problems), len(items), self.path.name, self.backup.name)
        return items

    def _read(self, path: Path) -> _Copy:
        out = _Copy()
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return out
        except OSError as e:
            out.exists = True
            out.problems.append(f"{path.name} unreadable ({e.strerror or e})")
            return out
        out.exists = True
        try:
            doc = json.loads(raw)
        except ValueError as e:  # includes bad UTF-8
            out.problems.append(f"{path.name} is not JSON ({e})")
            return out
        if isinstance(doc, list):  # the first format: a bare list, no checksums
            entries, checked = doc, False
        elif isinstance(doc, dict) and doc.get("format") == FILE_FORMAT and \
                isinstance(doc.get("namespaces"), list):
            entries, checked = doc["namespaces"], True
        else:
            out.problems.append(f"{path.name} is not a kvtier namespace registry")
            return out
        for i, d in enumerate(entries):
            try:
                if checked and _entry_crc(d) != d.get("crc"):
                    raise ValueError("checksum mismatch")
                ns = Namespace.from_dict(d)
                validate_name(ns.name)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                out.problems.append(f"{path.name} entry {i} is damaged ({e})")
                continue
            out.items[ns.name] = ns
        return out

    def save(self, items: dict[str, Namespace]) -> None:
        """Write both copies; raises StorageFull (a full disk) or KVTierError, changing neither
        copy's last complete state."""
        entries = []
        for ns in items.values():
            d = ns.to_dict()
            entries.append({**d, "crc": _entry_crc(d)})
        body = json.dumps({"format": FILE_FORMAT, "version": 1, "namespaces": entries},
                          indent=1).encode()
        for path in (self.path, self.backup):
            try:
                _write_durably(path, body)
            except OSError as e:
                cls = StorageFull if e.errno in (errno.ENOSPC, errno.EDQUOT) else KVTierError
                raise cls(f"namespace registry {path}: cannot write it ({e.strerror or e})") from None


def _entry_crc(d: dict) -> int:
    """crc32c of an entry's canonical JSON (its ``crc`` field left out)."""
    body = {k: v for k, v in d.items() if k != "crc"}
    return crc32c.crc32c(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _write_durably(path: Path, body: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class NamespaceRegistry:
    """Thread-safe name -> Namespace map, optionally persisted to ``path`` (``RegistryFile``).

    A damaged registry never stops the cache from opening: ``problems`` lists what was found
    (logged), and ``errors`` counts it.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self._file = RegistryFile(Path(path)) if path else None
        self._lock = threading.Lock()
        self._items: dict[str, Namespace] = {}
        if self._file is not None:
            self._items = self._file.load()
            if self._file.problems:
                try:  # rewrite both copies from what was recovered
                    self._file.save(self._items)
                except KVTierError as e:
                    log.error("%s", e)

    @property
    def problems(self) -> list[str]:
        """What was wrong with the registry files when they were loaded (empty if nothing)."""
        return list(self._file.problems) if self._file else []

    @property
    def errors(self) -> int:
        return len(self.problems)

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
                    self._save_or_undo(ns.name, old)
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
            self._save_or_undo(ns.name, None)
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
                old, ns = ns, replace(ns, layout=layout)
                self._items[name] = ns
                self._save_or_undo(name, old)
            return ns

    def remove(self, name: str) -> Namespace:
        """Forget ``name``. If the file cannot be written now, the next save catches up (until
        then a restart would bring back the entry, with none of its blocks)."""
        with self._lock:
            ns = self._items.pop(name, None)
            if ns is None:
                raise UnknownNamespace(f"unknown namespace {name!r}")
            if self._file is not None:
                try:
                    self._file.save(self._items)
                except KVTierError as e:
                    log.error("%s; namespace %r is removed in memory only for now", e, name)
            return ns

    def _save_or_undo(self, name: str, old: Namespace | None) -> None:
        """Persist an added or changed entry; if that fails, undo it and raise: blocks stored
        under an entry a restart would not know could never be found again."""
        if self._file is None:
            return
        try:
            self._file.save(self._items)
        except KVTierError:
            if old is None:
                del self._items[name]
            else:
                self._items[name] = old
            raise
