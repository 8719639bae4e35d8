"""The sidecar client's HTTP calls as data, and its error answers as exceptions.

An operation of the client (``kvtier.client_ops``) is a generator that yields the ``Call``s it
needs and returns its result, so the sync and the async client share one implementation and
each runs it with its own transport. An error answer becomes its ``kvtier.errors`` class by the
name the server gives it, else ``RemoteError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import httpx
import msgpack

from kvtier import errors as kerrors
from kvtier.client_answers import Answer
from kvtier.errors import InvalidRequest, KVTierError
from kvtier.keys import as_token_array
from kvtier.wire import MSGPACK, pack_pieces

Op = Generator["Call", "httpx.Response | Answer", Any]


class Call:
    """One HTTP request of an operation (what ``httpx``'s ``request`` takes). ``bulk``: its
    answer may be large (KV), so the client reads it straight into pooled memory where it can
    (``kvtier.client_answers``). A body in ``Pieces`` (KV) goes the same way, sent as it lies."""

    __slots__ = ("method", "path", "json", "content", "headers", "params", "bulk")

    def __init__(self, method: str, path: str, *, json: Any = None, content: bytes | Pieces | None = None,
                 headers: dict | None = None, params: dict | None = None, bulk: bool = False) -> None:
        self.method, self.path, self.json = method, path, json
        self.content, self.headers, self.params = content, headers, params
        self.bulk = bulk

    @property
    def direct(self) -> bool:
        """Sent by ``DirectAnswers`` where the client has one: a large answer or a large body."""
        return self.bulk or isinstance(self.content, Pieces)

    @property
    def resend(self) -> bool:
        """Whether sending it twice does no harm: a read (a bulk answer), or a PUT or DELETE."""
        return self.bulk or self.method in ("GET", "PUT", "DELETE")


def bulk_request(http: httpx.Client | httpx.AsyncClient, call: Call) -> tuple[httpx.Request, Pieces | None]:
    """``call`` built by ``http`` (its URL, auth and headers) for ``DirectAnswers.fetch``, and
    its body's pieces: a body in ``Pieces`` is left out of the request (``fetch`` sends the
    pieces as they lie; its length is a header)."""
    if isinstance(call.content, Pieces):
        pieces, body = call.content, None
    else:
        pieces, body = None, call.content
    request = http.build_request(call.method, call.path, json=call.json, content=body, headers=call.headers,
                                 params=call.params)
    return request, pieces


class RemoteError(KVTierError):
    """An error answer the client has no local class for (401, 403, 413, 5xx...)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status, self.error, self.message = status, error, message


_ERRORS: dict[str, type[KVTierError]] = {
    name: cls for name, cls in vars(kerrors).items()
    if isinstance(cls, type) and issubclass(cls, KVTierError)
}


def with_fresh_namespace(make: Callable[[], Op], forget: Callable[[], None]) -> Op:
    """Run the operation ``make()`` builds; refused as malformed (``InvalidRequest``: 400/422,
    or the client's own check), run it once more after ``forget()`` drops what the client keeps
    of the namespace (a layout, a page size). Why: another client may drop the namespace and
    register it again with another shape, and the kept one then sizes every call wrong."""
    try:
        return (yield from make())
    except InvalidRequest:
        forget()
    return (yield from make())


def error_for(status: int, error: str, message: str) -> KVTierError:
    cls = _ERRORS.get(error)
    return cls(message) if cls is not None else RemoteError(status, error, message)


def raise_for(resp: httpx.Response | Answer) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        error, message = str(body["error"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        error, message = "HTTPError", resp.text[:500]
    raise error_for(resp.status_code, error, message)


def headers_for(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def _packed_tokens(token_ids: Any) -> bytes:
    """Token ids as little-endian int64 bytes: what ``kvtier.server.body`` takes without parsing."""
    return as_token_array(token_ids).astype("<i8", copy=False).tobytes()


def tokens_call(method: str, path: str, body: dict[str, Any], token_ids: Any,
                 accept: str | None = None, bulk: bool = False) -> Call:
    """A request naming a prefix: msgpack with the token ids packed (``kvtier.server.body``); a
    4K-token JSON body costs more to build and parse than the round trip itself."""
    return msgpack_call(method, path, {**body, "token_ids": _packed_tokens(token_ids)}, accept, bulk)


def msgpack_call(method: str, path: str, body: dict[str, Any], accept: str | None = None,
                 bulk: bool = False) -> Call:
    """A request with a msgpack body. Bodies with KV go out as they lie in memory: the tensors'
    own bytes, never packed into one buffer (a 1 GiB put would be built twice), in pieces the
    transport sends without re-slicing a big buffer on every partial write (httpcore slices
    what a send left over: one 1 GiB piece made an engine-page put take 83 s)."""
    headers = {"content-type": MSGPACK, **({"accept": accept} if accept else {})}
    nbytes, pieces = pack_pieces(body)
    if len(pieces) == 1:
        return Call(method, path, content=bytes(pieces[0]), headers=headers, bulk=bulk)
    return Call(method, path, content=Pieces(pieces), headers={**headers, "content-length": str(nbytes)}, bulk=bulk)


class Pieces:
    """A request body sent piece by piece (``wire.pack_pieces``), by either client."""

    def __init__(self, pieces: list[bytes | memoryview]) -> None:
        self.pieces = pieces

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return iter(self.pieces)

    async def __aiter__(self) -> AsyncIterator[bytes | memoryview]:
        for piece in self.pieces:
            yield piece


def keys_call(method: str, path: str, namespace: str, keys: list[bytes],
               accept: str | None = None, bulk: bool = False) -> Call:
    """A request naming engine blocks: msgpack with the keys as raw bytes."""
    headers = {"content-type": MSGPACK, **({"accept": accept} if accept else {})}
    return Call(method, path, content=msgpack.packb({"namespace": namespace, "keys": keys}), headers=headers,
                bulk=bulk)
