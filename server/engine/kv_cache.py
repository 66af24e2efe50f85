"""The paged key/value cache: pools of fixed-size blocks per layer, allocated once from the operator's budget.

A replica's memory is therefore known when it starts and does not grow with load. Which blocks a sequence holds is
the block manager's business (block_manager.py, pure Python); this class only holds the tensors, writes a step's
new keys/values into their slots and hands each layer's pools to the attention kernel (attention.py), which reads
the blocks in place.

Per layer, keys are [blocks, H_kv, Dh, B] (each block's keys transposed, so the kernel reads one slot per vector
lane) and values [blocks, H_kv, B, Dh]. Layers of one window share a group and a block numbering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .block_manager import GroupSpec


@dataclass(frozen=True)
class CacheShape:
    """What one block costs: per layer H_kv x B slots of Dh keys and Dh values."""
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def block_bytes(self, layers: int) -> int:
        return 2 * layers * self.kv_heads * self.block_size * self.head_dim * torch.finfo(self.dtype).bits // 8


def plan_groups(windows: list[int | None], budget_bytes: int, shape: CacheShape, max_rows: int,
                max_chunk: int) -> list[GroupSpec]:
    """Split the budget into one pool per distinct window. A sliding group needs at most
    (window + chunk) slots per running sequence, so it gets no more than that for `max_rows` sequences; the rest
    goes to the full-attention group."""
    by_window: dict[int | None, list[int]] = {}
    for layer, w in enumerate(windows):
        by_window.setdefault(w, []).append(layer)
    specs: list[GroupSpec] = []
    left = budget_bytes
    full = by_window.pop(None, None)
    slide_cap = lambda w: max_rows * (-(-(w + max_chunk) // shape.block_size) + 2)  # noqa: E731
    sliding = sorted(by_window.items())
    if full is None:  # every layer slides: the whole budget to the sliding groups, in proportion to their layers
        total = sum(len(layers) for _, layers in sliding)
        for w, layers in sliding:
            n = int(budget_bytes * len(layers) / total) // shape.block_bytes(len(layers))
            specs.append(GroupSpec(num_blocks=max(1, n), window=w, layers=tuple(layers)))
        return specs
    for w, layers in sliding:
        fair = budget_bytes * len(layers) // len(windows) // shape.block_bytes(len(layers))
        n = max(1, min(slide_cap(w), fair))
        specs.append(GroupSpec(num_blocks=n, window=w, layers=tuple(layers)))
        left -= n * shape.block_bytes(len(layers))
    n_full = max(1, left // shape.block_bytes(len(full)))
    return [GroupSpec(num_blocks=n_full, window=None, layers=tuple(full))] + specs


class PagedKVCache(Cache):
    def __init__(self, groups: list[GroupSpec], num_layers: int, shape: CacheShape, device: torch.device):
        super().__init__(layers=[])
        self.shape, self.device, self.dtype = shape, device, shape.dtype
        self.layer_group = [0] * num_layers
        for g, spec in enumerate(groups):
            for layer in spec.layers:
                self.layer_group[layer] = g
        H, Dh, B = shape.kv_heads, shape.head_dim, shape.block_size
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # allocated once, uninitialized: the kernel reads only slots it has written (a block's unwritten slots are
        # masked before they count), so memory is committed as blocks first fill, never beyond the budget
        with torch.inference_mode(False):
            for layer in range(num_layers):
                n = groups[self.layer_group[layer]].num_blocks
                self.keys.append(torch.empty(n, H, Dh, B, dtype=shape.dtype, device=device))
                self.values.append(torch.empty(n, H, B, Dh, dtype=shape.dtype, device=device))
        self._pool_layer = {t.data_ptr(): i for i, t in enumerate(self.keys)}
        self.write: list[tuple[torch.Tensor, torch.Tensor]] = []  # per group: flat_index(...) of this step

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def layer_of_pool(self, keys: torch.Tensor) -> int | None:
        return self._pool_layer.get(keys.data_ptr())

    def flat_index(self, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where T tokens' keys and values go (blocks, offsets: [T]): element indices into a key pool viewed flat,
        [T * H * Dh] in (token, head, dim) order, and row indices into a value pool viewed as [-1, Dh], [T * H].
        One index_copy_ per layer and side then writes the step (advanced-index assignment into the transposed
        keys cost 1 ms per layer)."""
        H, Dh, B = self.shape.kv_heads, self.shape.head_dim, self.shape.block_size
        heads = torch.arange(H, device=blocks.device)
        rows = blocks[:, None] * H + heads[None, :]                                      # [T, H]
        k = ((rows[:, :, None] * Dh + torch.arange(Dh, device=blocks.device)) * B + offsets[:, None, None])
        v = rows * B + offsets[:, None]
        return k.reshape(-1), v.reshape(-1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this step's keys/values [1, H_kv, T, Dh] at their slots; return the layer's pools."""
        k_idx, v_idx = self.write[self.layer_group[layer_idx]]
        self._write(layer_idx, k_idx, v_idx, key_states[0], value_states[0])
        return self.keys[layer_idx], self.values[layer_idx]

    def _write(self, layer: int, k_idx: torch.Tensor, v_idx: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor) -> None:
        """keys/values [H, T, Dh] of T tokens at the slots k_idx/v_idx stand for."""
        Dh = self.shape.head_dim
        k = keys.transpose(0, 1).reshape(-1).to(self.dtype)                              # [T * H * Dh]
        v = values.transpose(0, 1).reshape(-1, Dh).to(self.dtype)                        # [T * H, Dh]
        self.keys[layer].view(-1).index_copy_(0, k_idx, k)
        self.values[layer].view(-1, Dh).index_copy_(0, v_idx, v)

    def write_prefix(self, blocks: torch.Tensor, offsets: torch.Tensor, kv: torch.Tensor, layers: list[int]) -> None:
        """Prefix-tuning key/values [L, 2, H_kv, P, Dh] into slots (blocks/offsets [P]) of the given layers."""
        k_idx, v_idx = self.flat_index(blocks, offsets)
        for layer in layers:
            self._write(layer, k_idx, v_idx, kv[layer, 0], kv[layer, 1])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0
