"""A slot cache: one preallocated key/value buffer per layer, one row per running request.

Rows stay compact (0..n-1), so a decode step reads a view of the buffer instead of concatenating or filtering the
whole cache. Each row holds its prefix key/values in slots [0, P) and its tokens from slot P on. Buffers grow by
doubling, so memory follows the real batch and lengths rather than the configured maxima.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[])
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []    # per layer [rows, H_kv, slots, Dh]
        self.values: list[torch.Tensor] = []
        self._alloc(8, 256)
        # set by `prepare` before each forward
        self._first, self._end = 0, 0  # rows [first, end); ints, not a slice, so a compiled step keeps them symbolic
        self._flat: torch.Tensor | None = None  # [n * H_kv * Q] write rows, derived from rows and slots
        self._kv_len = 0

    @property
    def capacity(self) -> tuple[int, int]:
        return self.keys[0].shape[0], self.keys[0].shape[2]

    def _alloc(self, rows: int, slots: int) -> None:
        shape = (rows, self.kv_heads, slots, self.head_dim)
        # ordinary tensors even when grown inside inference mode: every buffer is the same kind of tensor, so a
        # compiled decode step (compiled_decode.py) still matches them after the cache grows
        with torch.inference_mode(False):
            new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
            new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
            for old, new in ((self.keys, new_k), (self.values, new_v)):
                for o, n in zip(old, new):
                    n[: o.shape[0], :, : o.shape[2]] = o
        self.keys, self.values = new_k, new_v

    def ensure(self, rows: int, slots: int) -> None:
        have_rows, have_slots = self.capacity
        if rows <= have_rows and slots <= have_slots:
            return
        grow = lambda have, need: have if need <= have else max(need, 2 * have)  # noqa: E731
        self._alloc(grow(have_rows, rows), grow(have_slots, slots))

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def prepare(self, rows: slice, slots: torch.Tensor, kv_len: int) -> None:
        """The next forward runs rows `rows` (a contiguous range), writing its queries at `slots` [n, Q] and
        attending over the first `kv_len` slots."""
        n = slots.shape[0]
        self._first, self._end, self._kv_len = rows.start, rows.start + n, kv_len
        R, H, S, _ = self.keys[0].shape
        row_idx = torch.arange(rows.start, rows.start + n, device=slots.device)
        heads = torch.arange(H, device=slots.device)
        # element (row, head, slot) of a [R, H, S, Dh] buffer is row ((row * H + head) * S + slot) of its [-1, Dh]
        # view, so one index_copy_ per layer writes the step (advanced-index assignment was 11% of a decode step)
        self._flat = ((row_idx[:, None, None] * H + heads[None, :, None]) * S + slots[:, None, :]).reshape(-1)

    def write_prefixes(self, rows: list[int], prefixes: list[torch.Tensor]) -> None:
        """Copy each row's prefix [L, 2, H_kv, T_i, Dh] into its slots [0, T_i): one index_copy_ per layer and
        side for the whole prefill, however many tasks it mixes."""
        _, H, S, Dh = self.keys[0].shape
        dev = self.keys[0].device
        flat = torch.cat([((r * H + torch.arange(H, device=dev)[:, None]) * S
                           + torch.arange(p.shape[3], device=dev)[None, :]).reshape(-1)
                          for r, p in zip(rows, prefixes)])                                    # [N]
        kv = torch.cat([p.to(device=dev, dtype=self.dtype).reshape(p.shape[0], 2, -1, Dh) for p in prefixes],
                       dim=2)                                                                   # [L, 2, N, Dh]
        for layer in range(self.num_layers):
            self.keys[layer].view(-1, Dh).index_copy_(0, flat, kv[layer, 0])
            self.values[layer].view(-1, Dh).index_copy_(0, flat, kv[layer, 1])

    def move_row(self, src: int, dst: int, length: int) -> None:
        for buf in self.keys + self.values:
            buf[dst, :, :length] = buf[src, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this step's keys/values [n, H_kv, Q, Dh] at their slots; return the rows' first kv_len slots."""
        Dh = key_states.shape[-1]
        for buf, new in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            buf.view(-1, Dh).index_copy_(0, self._flat, new.reshape(-1, Dh).to(self.dtype))  # [n*H*Q, Dh]
        rows = slice(self._first, self._end)
        k, v = self.keys[layer_idx][rows], self.values[layer_idx][rows]                 # views [n, H, S, Dh]
        return k[:, :, : self._kv_len], v[:, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0
