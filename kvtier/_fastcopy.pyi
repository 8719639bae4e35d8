"""Types of kvtier/_fastcopy.c (a block's copy and its crc32c in one pass)."""

from collections.abc import Sequence

import numpy as np

gil_free_bytes: int  # copies of this many bytes or more release the GIL
available: int  # 1 where the CPU has AVX2 and VPCLMULQDQ, else 0 (copy_crc raises)

def copy_crc(dst: np.ndarray, offset: int, parts: Sequence[np.ndarray], crc: int = 0) -> int: ...
