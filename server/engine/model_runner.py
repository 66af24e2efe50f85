"""All tensor work of the engine: turn scheduled sequences into step tensors, run the model, sample.

Rows are compact: row i of every per-row tensor and of the slot cache belongs to `self.seqs[i]`. A finished row is
filled by moving the last row into it, so decode steps read contiguous views and never filter the cache.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from prompt_core import forward as fwd
from prompt_core.batch import build_prefill
from prompt_core.fingerprint import model_dims
from prompt_core.layout import RowPlan
from prompt_core.spec import PromptTensors

from .compiled_decode import CompiledDecode, decode_logits
from .head_cache import CachedHead, HeadCache
from .kv_cache import SlotCache
from .logits_processors import LogitsProcessor
from .request import Sequence, TokenLogprob
from .sampler import sample, token_logprobs


class ModelRunner:
    LOGPROB_CHUNK = 512  # prompt positions turned into [chunk, V] logits at a time (echo)

    def __init__(self, model: PreTrainedModel, device: torch.device, dtype: torch.dtype, max_rows: int,
                 head_cache_bytes: int = 1 << 30, processor: LogitsProcessor | None = None, compile: bool = False):
        self.model, self.device, self.dtype = model, device, dtype
        self.processor = processor  # logit_bias, penalties, grammar masks: see the hook before each sample()
        self.heads = HeadCache(head_cache_bytes)
        _, layers, _, kv_heads, head_dim = model_dims(model)
        self.cache = SlotCache(layers, kv_heads, head_dim, dtype, device)
        # the decode step compiled once at start-up (server/engine/compiled_decode.py), or None: eager
        self.compiled = CompiledDecode(model, self.cache, dtype, device) if compile else None
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
        plans, kv_prefixes = self._start_after_heads(seqs, tensors)
        step, readout = build_prefill(plans, [p.prefix for p in plans],
                                      [t.virtual if t is not None else None for t in tensors], self.device, self.dtype)
        kv_len = step.kv_len
        max_new = max(s.request.sampling.max_new_tokens for s in seqs)
        self.cache.ensure(base + k, kv_len + max_new)
        prefixed = [(base + i, kv) for i, kv in enumerate(kv_prefixes) if kv is not None]
        if prefixed:
            self.cache.write_prefixes(*map(list, zip(*prefixed)))
        self.cache.prepare(slice(base, base + k), step.slots, kv_len)
        hidden = fwd.hidden_states(self.model, step, self.cache)                     # [k, Q, D]
        scores = fwd.label_scores(self.model, hidden, readout)
        prompt_logprobs = self._prompt_logprobs(hidden, seqs, plans)
        gen = [i for i, s in enumerate(seqs) if s.samples]
        results: list[int | list[float] | None] = [sc.tolist() for sc in scores]
        rows = torch.arange(base, base + k, device=self.device)
        self._set_rows(rows, seqs, plans)
        sampled = None
        if gen:
            gi = torch.tensor(gen, device=self.device)
            logits = fwd.logits(self.model, hidden[gi, readout.last_q[gi]])           # [g, V]
            r = rows[gi]
            self._record(logits, [seqs[i] for i in gen])
            # -- logits processing hook (sampler side): the only call into per-request processors; log-probabilities
            # below stay those of the model's raw logits
            processed = logits
            if self.processor is not None:
                processed = self.processor.apply(logits, [seqs[i] for i in gen])
            toks = sample(processed, self.temperature[r], self.top_k[r], self.top_p[r], self.seed[r], self.step[r])
            if self.processor is not None:
                self.processor.accept([seqs[i] for i in gen], toks)
            # -- end of hook
            self.last_token[r] = toks
            self.step[r] += 1
            sampled = self._sampled_logprobs(logits, toks, [seqs[i] for i in gen])
            for i, tok in zip(gen, toks.tolist()):
                results[i] = tok
        # the forward succeeded: only now does any sequence's state change
        for i, lps in prompt_logprobs.items():
            seqs[i].prompt_logprobs = lps
        if sampled:
            for s, lp in sampled:
                s.output_logprobs.append(lp)
        return results

    def _prompt_logprobs(self, hidden: torch.Tensor, seqs: list[Sequence],
                         plans: list[RowPlan]) -> dict[int, list[TokenLogprob]]:
        """With echo and logprobs: each input token's log-probability given everything before it in the row
        (prefix, virtual tokens, template text, earlier input tokens), from this prefill's hidden states.

        hidden: [k, Q, D]. Query j of row i holds plans[i].ids[j], so token p of the original plan is predicted by
        query p - 1 - shift, where shift is the cached head the row starts after (capped by the engine so that
        query is always computed here)."""
        want = [i for i, s in enumerate(seqs) if s.request.echo and s.request.logprobs is not None
                and s.prompt_logprobs is None and s.plan.input_span is not None]
        if not want:
            return {}
        Q = hidden.shape[1]
        flat, targets, owners = [], [], []
        for i in want:
            start, end = seqs[i].plan.input_span
            shift = seqs[i].plan.num_tokens + len(seqs[i].output_ids) - plans[i].num_tokens
            for p in range(max(start, 1), end):  # a token at position 0 has no context: its logprob is None
                assert p - 1 >= shift, "the cached head covers a query that echo needs"
                flat.append(i * Q + p - 1 - shift)
                targets.append(seqs[i].plan.ids[p])
                owners.append(i)
        top_n = max(seqs[i].request.top_n for i in want)
        L = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        h = hidden.reshape(-1, hidden.shape[-1])                                    # [k*Q, D]
        lp, top_lp, top_ids = [], [], []
        idx, tgt = L(flat), L(targets)                                              # [E], [E]
        for c in range(0, len(flat), self.LOGPROB_CHUNK):  # bounded memory: [chunk, V] logits at a time
            logits = fwd.logits(self.model, h[idx[c:c + self.LOGPROB_CHUNK]])        # [c, V]
            a, b, t = token_logprobs(logits, tgt[c:c + self.LOGPROB_CHUNK], top_n)  # [c], [c, N], [c, N]
            lp.append(a)
            top_lp.append(b)
            top_ids.append(t)
        out: dict[int, list[TokenLogprob]] = {i: [] for i in want}
        if flat:
            rows = zip(torch.cat(lp).tolist(), torch.cat(top_lp).tolist(), torch.cat(top_ids).tolist())
        else:
            rows = iter(())
        for i in want:
            if seqs[i].plan.input_span[0] == 0 < seqs[i].plan.input_span[1]:
                out[i].append(TokenLogprob(seqs[i].plan.ids[0], None))
        for owner, tok, (v, tl, ti) in zip(owners, targets, rows):
            n = seqs[owner].request.top_n
            out[owner].append(TokenLogprob(tok, v, tuple(zip(ti[:n], tl[:n]))))
        return out

    @staticmethod
    def _sampled_logprobs(logits: torch.Tensor, toks: torch.Tensor,
                          seqs: list[Sequence]) -> list[tuple[Sequence, TokenLogprob]]:
        """The sampled tokens' log-probabilities for the rows that asked. logits: [m, V], toks: [m]."""
        want = [j for j, s in enumerate(seqs) if s.request.logprobs is not None]
        if not want:
            return []
        top_n = max(seqs[j].request.top_n for j in want)
        w = torch.tensor(want, device=logits.device)
        lp, top_lp, top_ids = token_logprobs(logits[w], toks[w], top_n)             # [w], [w, N], [w, N]
        out = []
        for j, v, tl, ti in zip(want, lp.tolist(), top_lp.tolist(), top_ids.tolist()):
            n = seqs[j].request.top_n
            out.append((seqs[j], TokenLogprob(int(toks[j]), v, tuple(zip(ti[:n], tl[:n])))))
        return out

    def _start_after_heads(self, seqs: list[Sequence], tensors: list[PromptTensors | None]):
        """Each row's plan and the key/values in front of it: a row whose task has a static head (leading virtual
        tokens, fixed instruction text) starts after the head's cached key/values, computed here on a miss (all
        misses of the step in one forward). Returns (plans, kv prefixes [L, 2, H_kv, P, Dh] or None)."""
        plans = [s.prefill_plan for s in seqs]
        kv = [t.prefix if t is not None else None for t in tensors]
        heads: dict[int, CachedHead] = {}
        missing: dict[tuple[str, int], list[int]] = {}
        for i, (s, plan) in enumerate(zip(seqs, plans)):
            n = min(s.head_len, plan.num_tokens - 1)
            if n <= 0 or self.heads.budget <= 0:
                continue
            key = (s.request.prompt.key, n)
            entry = self.heads.get(key, plan.ids, plan.virt)
            if entry is not None:
                heads[i] = entry
            else:
                missing.setdefault(key, []).append(i)
        if missing:
            firsts = [rows[0] for rows in missing.values()]
            computed = self._compute_heads([plans[i] for i in firsts], [keys[1] for keys in missing],
                                           [tensors[i] for i in firsts])
            for (key, rows), entry in zip(missing.items(), computed):
                self.heads.put(key, entry)
                for i in rows:
                    if entry.matches(plans[i].ids, plans[i].virt):
                        heads[i] = entry
        for i, entry in heads.items():
            n, p = len(entry.ids), plans[i]
            plans[i] = RowPlan(ids=p.ids[n:], virt=p.virt[n:], prefix=p.prefix + n, labels=p.labels)
            kv[i] = entry.kv
        return plans, kv

    def _compute_heads(self, plans: list[RowPlan], lengths: list[int],
                       tensors: list[PromptTensors | None]) -> list[CachedHead]:
        """Prefill the first `lengths[i]` tokens of each plan once, behind any prefix, and keep their key/values."""
        heads = [RowPlan(ids=p.ids[:n], virt=p.virt[:n], prefix=p.prefix) for p, n in zip(plans, lengths)]
        width = max(p.prefix for p in heads)
        cache = fwd.prefix_cache(self.model, [t.prefix if t is not None else None for t in tensors], width)
        step, _ = build_prefill(heads, [width] * len(heads), [t.virtual if t is not None else None for t in tensors],
                                self.device, self.dtype)
        fwd.hidden_states(self.model, step, cache)
        layers = cache.layers
        out = []
        for i, (p, n) in enumerate(zip(heads, lengths)):
            kv = torch.stack([torch.stack([torch.cat([side[i, :, :p.prefix], side[i, :, width:width + n]], dim=1)
                                           for side in (layer.keys, layer.values)]) for layer in layers])
            out.append(CachedHead(ids=tuple(p.ids), virt=tuple(p.virt), kv=kv.contiguous()))  # [L, 2, H, P+n, Dh]
        return out

    def _set_rows(self, rows: torch.Tensor, seqs: list[Sequence], plans: list[RowPlan]) -> None:
        """Take rows for new sequences and load their per-row state (once per request, at prefill)."""
        for s in seqs:
            s.row = len(self.seqs)
            self.seqs.append(s)
        cols = lambda f, dt: torch.tensor([f(s) for s in seqs], dtype=dt, device=self.device)  # noqa: E731
        prefix = torch.tensor([p.prefix for p in plans], dtype=torch.long, device=self.device)
        self.prefix[rows] = prefix
        self.tok_start[rows] = prefix
        self.lengths[rows] = prefix + torch.tensor([p.num_tokens for p in plans], dtype=torch.long, device=self.device)
        self.temperature[rows] = cols(lambda s: s.request.sampling.temperature, torch.float32)
        self.top_p[rows] = cols(lambda s: s.request.sampling.top_p, torch.float32)
        self.top_k[rows] = cols(lambda s: s.request.sampling.top_k, torch.long)
        self.seed[rows] = cols(lambda s: s.seed, torch.long)
        self.step[rows] = cols(lambda s: len(s.output_ids), torch.long)  # a resumed sequence keeps its draws

    @torch.inference_mode()
    def decode(self, kv_len: int) -> list[int]:
        """One token for every running row. kv_len: the longest row's length after this step."""
        n = self.num_rows
        self.cache.ensure(n, kv_len)
        rows = (self.last_token[:n], self.prefix[:n], self.tok_start[:n], self.lengths[:n])
        if self.compiled is not None:
            logits = self.compiled(*rows, kv_len)                                   # [n, V]
        else:
            logits = decode_logits(self.model, self.cache, *rows, kv_len, self.dtype)  # [n, V]
        self._record(logits, self.seqs)
        # -- logits processing hook (sampler side): the only call into per-request processors; log-probabilities
        # below stay those of the model's raw logits
        processed = logits
        if self.processor is not None:
            processed = self.processor.apply(logits, self.seqs)
        toks = sample(processed, self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seed[:n], self.step[:n])
        if self.processor is not None:
            self.processor.accept(self.seqs, toks)
        # -- end of hook
        self.lengths[:n] += 1
        self.step[:n] += 1
        self.last_token[:n] = toks
        for s, lp in self._sampled_logprobs(logits, toks, self.seqs):
            s.output_logprobs.append(lp)
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
