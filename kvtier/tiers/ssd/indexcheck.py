"""Checks of the LMDB index file before this process maps it.

LMDB maps ``data.mdb`` and trusts what it finds: a page number past the end of a truncated
file, or a damaged length inside a page, makes a read touch memory the file does not back, and
the process dies of SIGBUS (or SIGSEGV) — no exception to catch. So before the tier opens the
index, (1) ``file_problem`` reads the two meta pages with plain reads and compares the file's
size with the last page the environment uses, and (2) ``walk_problem`` has a separate process
read every record of every table (this file run as a script, importing only ``lmdb``): if the
file can crash a reader, that process is what dies. Each returns one line saying what is wrong,
or None.

The meta page layout is LMDB 0.9's (``MDB_page`` header, then ``MDB_meta``), 64-bit.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
P_META = 0x08
_PAGE_HEADER = struct.Struct("<QHHHH")  # pgno, pad, flags, lower, upper
_META = struct.Struct("<IIQQ")  # magic, version, address, mapsize
_PSIZE_AT = 16 + 24  # mm_dbs[FREE_DBI].md_pad holds the page size
_LAST_AT = 16 + 120  # mm_last_pg, then mm_txnid
_META_BYTES = 16 + 136
WALK_TIMEOUT_S = 600.0


def file_problem(path: str | os.PathLike, segments: int) -> str | None:
    """What is wrong with ``data.mdb`` at ``path`` that would crash a reader, or None.

    ``segments`` is how many segment files the data directory holds: an index that is missing
    or empty while they exist has lost every record (LMDB would silently start a new one).
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return f"index/data.mdb is missing but {segments} segment files exist" if segments else None
    if size == 0:
        return f"index/data.mdb is empty but {segments} segment files exist" if segments else None
    try:
        with open(path, "rb") as f:
            head = f.read(_META_BYTES)
            metas = [_meta(head, 0)]
            psize = metas[0][0] if metas[0] else 0
            if psize:
                f.seek(psize)
                metas.append(_meta(f.read(_META_BYTES), 1))
    except OSError as e:
        return f"index/data.mdb is unreadable ({e.strerror or e})"
    if size < _META_BYTES or (psize and size < psize + _META_BYTES):
        return f"index/data.mdb is truncated: {size} bytes, shorter than its two meta pages"
    first = metas[0]
    if first is None:
        return "index/data.mdb is not an LMDB file (bad meta page 0)"
    second = metas[1]  # read whenever page 0 named a page size
    if second is None:
        return "index/data.mdb is damaged (bad meta page 1)"
    if first[0] != psize or second[0] != psize:
        return "index/data.mdb is damaged (its meta pages disagree on the page size)"
    need = (max(first[1], second[1]) + 1) * psize
    if size < need:
        return (f"index/data.mdb is truncated: {size} bytes, its meta pages say "
                f"{need} bytes are in use")
    return None


def _meta(raw: bytes, pgno: int) -> tuple[int, int] | None:
    """(page size, last used page) from one meta page, or None if it is not one."""
    if len(raw) < _META_BYTES:
        return None
    no, _, flags, _, _ = _PAGE_HEADER.unpack_from(raw)
    magic, version, _, _ = _META.unpack_from(raw, 16)
    if no != pgno or not flags & P_META or magic != MAGIC or version != DATA_VERSION:
        return None
    (psize,) = struct.unpack_from("<I", raw, _PSIZE_AT)
    last, _ = struct.unpack_from("<QQ", raw, _LAST_AT)
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return None
    return psize, last


def walk_problem(directory: str | os.PathLike, timeout_s: float = WALK_TIMEOUT_S) -> str | None:
    """Read every record of the LMDB environment in ``directory`` in a child process.

    None when every record could be read; else one line: the LMDB error, or the signal that
    killed the reader (the file would have crashed this process).
    """
    try:
        res = subprocess.run([sys.executable, __file__, os.fspath(directory)],
                             capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"reading index/data.mdb did not finish in {timeout_s:.0f} s (a looping page chain?)"
    if res.returncode == 0:
        return None
    if res.returncode < 0:
        sig = signal.Signals(-res.returncode).name
        return f"index/data.mdb is damaged: reading it crashed a checking process ({sig})"
    lines = (res.stdout.strip() or res.stderr.strip() or "no output").splitlines()
    return f"index/data.mdb is damaged: {lines[-1]}"


def _walk(directory: str) -> int:
    """Touch the first and last byte of every value of every table (the child's job)."""
    import lmdb

    try:
        env = lmdb.open(directory, readonly=True, lock=False, max_dbs=16, subdir=True,
                        readahead=False)
        with env.begin(buffers=True) as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                for k, v in txn.cursor(db=db):
                    if len(v):
                        v[0], v[-1]  # noqa: B018  the touch is the check
                    if len(k):
                        k[0], k[-1]  # noqa: B018
        env.close()
    except lmdb.Error as e:
        print(f"{type(e).__name__}: {e}".replace("\n", " "))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_walk(sys.argv[1]))
