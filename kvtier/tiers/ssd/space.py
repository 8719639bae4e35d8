"""Room on the SSD tier: the byte budget, the free-disk floor, and a memory of a full disk.

Why a part of its own: "full" means two things here. Over the byte budget, evicting blocks
makes room; short of disk, it does not — a deleted block's bytes stay in its segment until
compaction rewrites it — so the manager must not evict for it (``DiskBound``). And a disk the
kernel refused (ENOSPC, a quota) must stay reported until its space is back, though a quota's
ENOSPC never shows in free space.

Not thread-safe by itself: the store calls the mutating methods with its lock held.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kvtier.config import format_size
from kvtier.tiers.ssd.directio import padded


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system under ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class DiskSpace:
    """The tier's room checks and its disk-full state.

    ``free`` measures free disk now (the tier passes its own seam, which tests blind to reach
    the kernel's ENOSPC).
    """

    def __init__(self, root: Path, capacity: int, floor: int, free: Callable[[], int]) -> None:
        self.root = root
        self.capacity = capacity
        self.floor = floor
        self.free = free
        self.short = 0  # padded size of the last put the disk refused; 0 after a success
        self.free_when_refused = 0  # free disk then: space is back once it grew by ``short``
        self.dead_space = True  # deleted blocks may hold disk space compaction could return
        self.compact_soon = False  # a put was refused for the disk: compact at the next tick

    def room_problem(self, used: int, nbytes: int, free: int) -> str | None:
        """Why a put of ``nbytes`` does not fit (``used`` bytes live or reserved), or None."""
        if used + nbytes > self.capacity:
            return (f"ssd tier full: a {nbytes}-byte block does not fit "
                    f"({format_size(used)} of {format_size(self.capacity)} used)")
        return self.disk_problem(nbytes, free)

    def disk_problem(self, nbytes: int, free: int) -> str | None:
        """Why the disk (not the budget) refuses a put of ``nbytes``, or None."""
        if free < nbytes:
            return (f"ssd tier: no space left on the device under {self.root} for a "
                    f"{nbytes}-byte block ({format_size(free)} free)")
        if free - nbytes < self.floor:
            return (f"ssd tier: free disk under {self.root} would fall below the floor "
                    f"({format_size(free)} free, floor {format_size(self.floor)})")
        return None

    def refused(self, nbytes: int) -> None:
        """Remember a put the disk refused (for ``problem``) and ask for a compaction if
        deleted blocks may hold space it could return."""
        self.short = max(self.short, padded(nbytes))
        self.free_when_refused = self.free()
        if self.dead_space:
            self.compact_soon = True
            self.dead_space = False

    def stored(self) -> None:
        """A put succeeded: the disk took it."""
        self.short = 0

    def take_compact_request(self) -> bool:
        """Whether a refused put asked for compaction since the last call."""
        asked, self.compact_soon = self.compact_soon, False
        return asked

    def problem(self) -> str | None:
        """The disk-full sentence for ``health``, or None.

        The disk is full while free space is under the floor, and after a put the disk refused
        until that put would fit again: free space has grown by its size since (a quota's
        ENOSPC does not show in free space: then until a put succeeds).
        """
        free, short = self.free(), self.short
        back = free - short >= self.floor and free >= self.free_when_refused + short
        if free < self.floor or (short and not back):
            last = f", a {format_size(short)} block did not fit" if short else ""
            return (f"disk full under {self.root} ({format_size(free)} free, floor "
                    f"{format_size(self.floor)}{last}): new blocks are refused, stored ones "
                    "are served")
        if short:
            self.short = 0  # the space came back
        return None
