"""All tensor work of the engine: turn scheduled sequences into step tensors, run the model, sample.

Rows are compact: row i of every per-row tensor and of the slot cache belongs to `self.seqs[i]`. A finished row is
filled by moving the last row into it, so decode steps read contiguous views and never filter the cache.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from prompt_core import forward as F
from prompt_core.batch import build_decode, build_prefill
from prompt_core.fingerprint import model_dims
from prompt_core.spec import PromptTensors

from .kv_cache import SlotCache
from .request import Sequence
from .sampler import sample


class ModelRunner:
    def __init__(self, model: PreTrainedModel, device: torch.device, dtype: torch.dtype, max_rows: int):
        self.model, self.device, self.dtype = model, device, dtype
        _, layers, _, kv_heads, head_dim = model_dims(model.config)
        self.cache = SlotCache(layers, kv_heads, head_dim, dtype, device)
        self.seqs: list[Sequence] = []
        long = lambda: torch.zeros(max_rows, dtype=torch.long, device=device)  # noqa: E731
        real = lambda: torch.zeros(max_rows, dtype=torch.float32, device=device)  # noqa: E731
        # per-row state, [max_rows] each
        self.prefix, self.tok_start, self.lengths, self.last_token = long(), long(), long(), long()
        self.temperature, self.top_p = real(), real()
        self.top_k, self.seed, self.step = long(), long(), long()
        self.trace: dict[str, list[torch.Tensor]] | None = None  # request id -> logits per step (tests, debugging)
        self._row_state = [self.prefix, self.tok_start, self.lengths, self.last_token, self.temperature,
                           self.top_p, self.top_k, self.seed, self.step]

    @property
    def num_rows(self) -> int:
        return len(self.seqs)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], tensors: list[PromptTensors | None]) -> list[int | list[float]]:
        """Prefill new sequences into rows after the running ones. Returns per sequence its first token
        (generation) or its label log-likelihoods (classification). Rows are taken only if the forward succeeds."""
        base, k = self.num_rows, len(seqs)
        plans = [s.prefill_plan for s in seqs]
        step, readout = build_prefill(plans, [p.prefix for p in plans],
                                      [t.virtual if t is not None else None for t in tensors], self.device, self.dtype)
        kv_len = step.mask.shape[-1]
        max_new = max(s.request.sampling.max_new_tokens for s in seqs)
        self.cache.ensure(base + k, kv_len + max_new)
        prefixed = [(base + i, t.prefix) for i, t in enumerate(tensors) if t is not None and t.prefix is not None]
        if prefixed:
            self.cache.write_prefixes(*map(list, zip(*prefixed)))
        self.cache.prepare(slice(base, base + k), step.slots, kv_len)
        hidden = F.hidden_states(self.model, step, self.cache)                     # [k, Q, D]
        scores = F.label_scores(self.model, hidden, readout)
        gen = [i for i, s in enumerate(seqs) if not s.is_classify]
        results: list[int | list[float]] = [sc.tolist() for sc in scores]
        rows = torch.arange(base, base + k, device=self.device)
        self._set_rows(rows, seqs)
        if gen:
            gi = torch.tensor(gen, device=self.device)
            logits = F.logits(self.model, hidden[gi, readout.last_q[gi]])           # [g, V]
            r = rows[gi]
            self._record(logits, [seqs[i] for i in gen])
            toks = sample(logits, self.temperature[r], self.top_k[r], self.top_p[r], self.seed[r], self.step[r])
            self.last_token[r] = toks
            self.step[r] += 1
            for i, tok in zip(gen, toks.tolist()):
                results[i] = tok
        return results

    def _set_rows(self, rows: torch.Tensor, seqs: list[Sequence]) -> None:
        """Take rows for new sequences and load their per-row state (once per request, at prefill)."""
        for s in seqs:
            s.row = len(self.seqs)
            self.seqs.append(s)
        cols = lambda f, dt: torch.tensor([f(s) for s in seqs], dtype=dt, device=self.device)  # noqa: E731
        prefix = cols(lambda s: s.plan.prefix, torch.long)
        self.prefix[rows] = prefix
        self.tok_start[rows] = prefix
        self.lengths[rows] = prefix + cols(lambda s: s.prefill_plan.num_tokens, torch.long)
        self.temperature[rows] = cols(lambda s: s.request.sampling.temperature, torch.float32)
        self.top_p[rows] = cols(lambda s: s.request.sampling.top_p, torch.float32)
        self.top_k[rows] = cols(lambda s: s.request.sampling.top_k, torch.long)
        self.seed[rows] = cols(lambda s: s.seed, torch.long)
        self.step[rows] = cols(lambda s: len(s.output_ids), torch.long)  # a resumed sequence keeps its draws

    @torch.inference_mode()
    def decode(self, kv_len: int) -> list[int]:
        """One token for every running row. kv_len: the longest row's length after this step."""
        n = self.num_rows
        step = build_decode(self.last_token[:n], self.prefix[:n], self.tok_start[:n], self.lengths[:n], kv_len,
                            self.dtype)
        self.cache.ensure(n, kv_len)
        self.cache.prepare(slice(0, n), step.slots, kv_len)
        hidden = F.hidden_states(self.model, step, self.cache)                     # [n, 1, D]
        logits = F.logits(self.model, hidden[:, 0])                                # [n, V]
        self._record(logits, self.seqs)
        toks = sample(logits, self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seed[:n], self.step[:n])
        self.lengths[:n] += 1
        self.step[:n] += 1
        self.last_token[:n] = toks
        return toks.tolist()

    def _record(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        if self.trace is not None:
            for row, s in zip(logits.cpu(), seqs):
                self.trace.setdefault(s.request_id, []).append(row)

    @torch.inference_mode()
    def release(self, seqs: list[Sequence]) -> None:
        """Free the rows of finished sequences, keeping rows compact by moving the last row into each hole."""
        for row in sorted((s.row for s in seqs if 0 <= s.row < self.num_rows), reverse=True):
            last = self.num_rows - 1
            if row != last:
                moved = self.seqs[last]
                self.cache.move_row(last, row, moved.kv_extent)
                for t in self._row_state:
                    t[row] = t[last]
                self.seqs[row] = moved
                moved.row = row
            self.seqs.pop()
        for s in seqs:
            s.row = -1
