"""Large host arrays that a model's decoder sessions take and leave, reused once nothing holds them.

A batched prefill copies each window's cross-attention keys and values into arrays of all its rows
(tiny.en, 8 windows: 147 MB), and every session grows its self-attention caches into new arrays; each
new array's pages are faulted in as they are first written. On the 2-core AMD EPYC VM of the
benchmark that ran at 0.6 GB/s (the hypervisor backs each page anew), where writing the same array
again runs at ~27 GB/s: tiny.en's batched workload spent 0.74 s of its 14.6 s in those copies.
Memory the previous batch left is the same size as the next batch needs, so it is kept and handed out
again instead of being returned and faulted in once more.
"""

from __future__ import annotations

import sys
import threading
from math import prod

import numpy as np


class HostArrayPool:
    """Arrays handed out as views of flat buffers this pool keeps; a buffer is free again once no view
    of it (nor anything made from one: a numpy view, a MAX buffer over it) is alive, which CPython's
    reference count says exactly. `take` hands out the smallest free buffer that holds the array and at
    most `slack` times its size, else a new one; a new one replaces the free buffers smaller than it
    (they would only be outgrown), so what is kept beyond the arrays in use is at most the free buffers
    of the last sizes asked for."""

    def __init__(self, slack: float = 2.0):
        self._buffers: list[np.ndarray] = []
        self._slack = slack
        self._lock = threading.Lock()  # sessions of one model may run on several threads (the server)

    def take(self, shape, dtype=np.float32, zeros: bool = False) -> np.ndarray:
        """An array of `shape` and `dtype`, uninitialised (zeros=True: zeros)."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        nbytes = prod(shape) * dtype.itemsize
        with self._lock:
            free = self._free_indices()
            fits = [i for i in free if nbytes <= self._buffers[i].nbytes <= self._slack * max(nbytes, 1)]
            if fits:
                buffer = self._buffers[min(fits, key=lambda i: self._buffers[i].nbytes)]
            else:
                outgrown = {i for i in free if self._buffers[i].nbytes < nbytes}
                self._buffers = [b for i, b in enumerate(self._buffers) if i not in outgrown]
                buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
                self._buffers.append(buffer)
            array = buffer[:nbytes].view(dtype).reshape(shape)
        if zeros:
            array.fill(0)
        return array

    def drop_free(self) -> None:
        """Lets go of the free buffers (a session that has taken what it needs until its end: what it
        left, its prefill's row arrays and a cache it outgrew, would otherwise be kept while it decodes)."""
        with self._lock:
            free = set(self._free_indices())
            self._buffers = [b for i, b in enumerate(self._buffers) if i not in free]

    def _free_indices(self) -> list[int]:
        # a free buffer's only references: the pool's list and getrefcount's own argument
        return [i for i in range(len(self._buffers)) if sys.getrefcount(self._buffers[i]) == 2]

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._buffers)
