"""Opening and closing the SSD tier's data directory: lock it, check and open the index,
migrate an old format, reconcile index and segments, and mark it in use until a clean close.

The "in use" mark (a flag in the index, cleared by a clean close) is how the next open knows
the last run crashed: records whose payload was not fsync'd before they committed are then
verified (``recovery``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvtier.config import SSDTierConfig
from kvtier.errors import DataDirError, KVTierError, StorageFull
from kvtier.tiers.ssd.datadir import VERSION, format_version, open_data_dir, write_version
from kvtier.tiers.ssd.directio import probe_direct_io
from kvtier.tiers.ssd.index import Index
from kvtier.tiers.ssd.migrate import bind_keys
from kvtier.tiers.ssd.recovery import Recovered, open_index, recover
from kvtier.tiers.ssd.segments import SegmentSet

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OpenDirectory:
    """A data directory opened for one process (``close_directory`` releases it)."""

    root: Path
    lock_fd: int
    index: Index
    segments: SegmentSet
    found: Recovered  # what recovery kept and dropped
    direct_io: bool
    marked: bool  # the in-use mark is written (False on a full disk: reads only, for now)


def open_directory(config: SSDTierConfig, streams: int,
                   on_segment_created: Callable[[], None]) -> OpenDirectory:
    """Open ``config.path``; raises ``DataDirError`` naming the directory and the problem."""
    assert config.path, "checked by the tier"
    root, lock_fd = open_data_dir(config.path)
    try:
        index = open_index(root, config.map_size, sync=config.durability != "none")
    except DataDirError:
        os.close(lock_fd)
        raise
    direct_io = bool(config.direct_io) and probe_direct_io(root / "segments")
    segments = SegmentSet(root / "segments", config.segment_bytes, direct_io, on_segment_created,
                          streams=streams)
    try:
        _upgrade(root, index, segments.directory)
        found = recover(index, segments)
        marked = mark_open(index, root)
    except Exception as e:
        close_directory(segments, index, lock_fd)
        raise DataDirError(f"data directory {root}: recovery failed ({e})") from None
    return OpenDirectory(root, lock_fd, index, segments, found, direct_io, marked)


def mark_open(index: Index, root: Path) -> bool:
    """Record that the directory is open (a clean close clears it). False while the index
    cannot take the write (a full disk): the tier still opens and serves reads, and puts are
    refused until the mark is written."""
    try:
        index.set_flag(b"clean", b"0")
        index.sync()
    except StorageFull as e:
        log.warning("ssd tier under %s cannot mark itself open yet: %s", root, e)
        return False
    return True


def close_cleanly(segments: SegmentSet, index: Index, lock_fd: int, root: Path,
                  sync_segments: bool) -> None:
    """Mark the directory cleanly closed (segments fdatasync'd first when ``sync_segments``:
    durability ``none`` never synced them) and release it. A failure is logged: the next open
    then treats this run as a crash."""
    try:
        if sync_segments:
            for seg in list(segments.by_id.values()):
                seg.sync()
        index.set_flag(b"clean", b"1")
        index.sync()
    except (OSError, KVTierError) as e:
        log.error("ssd tier under %s did not close cleanly: %s", root, e)
    finally:
        close_directory(segments, index, lock_fd)


def close_directory(segments: SegmentSet, index: Index, lock_fd: int) -> None:
    for seg in list(segments.by_id.values()):
        seg.close()
    segments.by_id.clear()
    index.close()
    os.close(lock_fd)


def _upgrade(root: Path, index: Index, segment_dir: Path) -> None:
    """Bind a format-1 directory's records to their keys (``migrate``); the version file says 2
    once all are. On a full disk it is left for the next open: format-1 records stay readable
    (checked the old way) meanwhile."""
    if format_version(root) >= VERSION:
        return
    try:
        bind_keys(index, segment_dir)
        write_version(root, VERSION)
    except (StorageFull, OSError) as e:
        log.warning("ssd tier under %s stays at format 1 until the next open: %s", root, e)
