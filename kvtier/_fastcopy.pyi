"""Types of kvtier/_fastcopy.c (a block's copies: into its slot with its crc32c, out into tensors; the crc32c of pieces)."""

from collections.abc import Sequence

import numpy as np

gil_free_bytes: int  # copies of this many bytes or more (in one call) release the GIL
stream_bytes: int  # copies of this many bytes or more (in one call) stream their stores past the cache
available: int  # 1 where the CPU has AVX2 and VPCLMULQDQ, else 0 (copy_layers raises)

def copy_layers(dst: np.ndarray, offsets: Sequence[int], payloads: Sequence[Sequence[np.ndarray]],
                row: int = -1) -> list[int]: ...
def copy_blocks(dsts: Sequence[np.ndarray], offsets: Sequence[int], payloads: Sequence[Sequence[np.ndarray]],
                rows: Sequence[int]) -> list[list[int]]: ...
def aligned(parts: Sequence[np.ndarray | bytes | bytearray | memoryview], align: int) -> bool: ...
def crc_parts(parts: Sequence[np.ndarray | bytes | bytearray | memoryview], value: int = 0) -> int: ...
def copy_runs(dsts: Sequence[np.ndarray], src: np.ndarray, plan: np.ndarray) -> None: ...
