"""All tensor work of the engine: one packed forward per step over every scheduled query, then sampling.

A step's queries (chunks of prompts being prefilled and one token per decoding row, of any task and kind) are laid
end to end as one sequence of T tokens: the linear layers see T rows and no padding, and the attention kernel gives
each query exactly its own keys (attention.py), read from its blocks in the paged cache (kv_cache.py). Virtual
tokens are gathered into the embeddings, prefix-tuning key/values are written into their slots once, and the rows
that finish a prompt or decode share one sampling path with its logits-processing hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
from transformers import PreTrainedModel

from prompt_core import forward as fwd

from .attention import GroupStep, PagedStep, QueryMeta, cache_context, paged_step
from .kv_cache import PagedKVCache
from .logits_processors import LogitsProcessor
from .request import Sequence, TokenLogprob
from .sampler import sample, token_logprobs
from .scheduler import Scheduled


@dataclass
class RunResult:
    token: int | None = None                # the sampled next token of a generating sequence
    scores: list[float] | None = None       # each label's log-likelihood, when a classify prompt completes


@dataclass
class StepLayout:
    """One step's queries in Python lists (T tokens over S scheduled sequences), before they become tensors."""
    ids: list[int] = field(default_factory=list)
    virt: list[int] = field(default_factory=list)      # row of the step's virtual-token table, or -1
    seq: list[int] = field(default_factory=list)       # which scheduled sequence
    slot: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    ctx_end: list[int] = field(default_factory=list)
    seg_start: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)   # first token of each scheduled sequence
    tables: list[torch.Tensor] = field(default_factory=list)   # per group: the virtual tokens' source tensors


def label_queries(seq: Sequence) -> tuple[list[int], list[int], list[int]]:
    """A classify row's label tokens as queries after its prompt: (token ids, position offsets after the prompt,
    segment start offsets). Each label's verbalizer but its last token is fed; the label sees the whole prompt and
    its own earlier tokens, so each label is scored as if alone."""
    ids, pos, seg = [], [], []
    for label in seq.plan.labels:
        first = len(ids)
        for k, tok in enumerate(label[:-1]):
            ids.append(tok)
            pos.append(k)
            seg.append(first)
    return ids, pos, seg


class ModelRunner:
    LOGPROB_CHUNK = 512  # prompt positions turned into [chunk, V] logits at a time (echo)

    def __init__(self, model: PreTrainedModel, device: torch.device, dtype: torch.dtype, cache: PagedKVCache,
                 block_size: int, windows: list[int], processor: LogitsProcessor | None = None,
                 intercept_sdpa: bool = False):
        self.model, self.device, self.dtype = model, device, dtype
        self.cache, self.block_size = cache, block_size
        self.windows = windows              # per group: its attention window (0: full)
        self.processor = processor          # logit_bias, penalties, grammar masks: the hook before sample()
        self.intercept_sdpa = intercept_sdpa
        self.trace: dict[str, list[torch.Tensor]] | None = None  # request id -> logits per step (tests, debugging)
        self.compiled = None                # no compiled step with the paged cache (see docs/benchmarks.md)
        self._mask = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)  # the model's masks are not used

    # ---- one step
    @torch.inference_mode()
    def run(self, batch: list[Scheduled], abandon: Callable[[], bool] | None = None) -> list[RunResult]:
        """Compute every scheduled query in one forward; sample the rows that complete. Sequence state changes
        only once everything succeeded. `abandon`, asked between layers, may stop the forward (StepAbandoned):
        the keys/values it wrote sit in slots that no sequence counts as computed, so the step's rerun overwrites
        them."""
        layout = self._layout(batch)
        self._write_prefixes(batch)
        hidden = self._forward(layout, batch, abandon)                          # [T, D]
        results = [RunResult() for _ in batch]
        prompt_lps = self._prompt_logprobs(hidden, batch, layout)
        for i, scores in self._label_scores(hidden, batch, layout).items():
            results[i].scores = scores
        sampled = self._sample(hidden, batch, layout, results)
        for item in batch:   # the forward succeeded: now state may change
            s = item.seq
            if s in prompt_lps:
                s.prompt_logprobs = (s.prompt_logprobs or []) + prompt_lps[s]
                s.prompt_lp_done = item.start + item.count + 1 >= s.plan.input_span[1]
        for s, lp in sampled:
            s.output_logprobs.append(lp)
        for item in batch:
            item.seq.prefix_written = True
        return results

    def _layout(self, batch: list[Scheduled]) -> StepLayout:
        out = StepLayout()
        table_of: dict[int, int] = {}
        for i, item in enumerate(batch):
            s = item.seq
            P, nt = s.plan.prefix, s.plan.num_tokens
            plain = nt + len(s.output_ids) if s.samples else nt   # prompt, then tokens generated before a preemption
            lo, hi = item.start, item.start + item.count
            out.offsets.append(len(out.ids))
            a, b = lo, min(hi, plain)
            if a < b:
                if a < nt:
                    out.ids.extend(s.plan.ids[a:min(b, nt)])
                    virt = s.plan.virt[a:min(b, nt)]
                    if any(v >= 0 for v in virt):
                        base = self._table_offset(s, out, table_of)
                        virt = [v + base if v >= 0 else -1 for v in virt]
                    out.virt.extend(virt)
                if b > nt:
                    out.ids.extend(s.output_ids[max(a, nt) - nt:b - nt])
                    out.virt.extend([-1] * (b - max(a, nt)))
                out.slot.extend(range(P + a, P + b))
                out.pos.extend(range(P + a, P + b))
                out.ctx_end.extend([0] * (b - a))
                out.seg_start.extend([0] * (b - a))
            if hi > plain:  # classify: label tokens after the prompt
                ids, pos, seg = label_queries(s)
                a, b = max(lo, nt) - nt, hi - nt
                out.ids.extend(ids[a:b])
                out.virt.extend([-1] * (b - a))
                out.slot.extend(range(P + nt + a, P + nt + b))
                out.pos.extend(P + nt + p for p in pos[a:b])
                out.ctx_end.extend([P + nt] * (b - a))
                out.seg_start.extend(P + nt + g for g in seg[a:b])
            out.seq.extend([i] * item.count)
        return out

    @staticmethod
    def _table_offset(seq: Sequence, out: StepLayout, table_of: dict[int, int]) -> int:
        """Rows of one task share one copy of its virtual tokens in the step's table."""
        table = seq.tensors.virtual
        if id(table) not in table_of:
            table_of[id(table)] = sum(t.shape[0] for t in out.tables)
            out.tables.append(table)
        return table_of[id(table)]

    def _forward(self, layout: StepLayout, batch: list[Scheduled],
                 abandon: Callable[[], bool] | None = None) -> torch.Tensor:
        dev = self.device
        L = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
        B = self.block_size
        groups, writes = [], []
        for g, window in enumerate(self.windows):
            tables = [item.seq.blocks.tables[g] for item in batch]
            width = max(len(t) for t in tables)
            rows = [t + [0] * (width - len(t)) for t in tables]
            groups.append(GroupStep(block_table=i32([[max(b, 0) for b in r] for r in rows]), window=window))
            blocks = [tables[q][s // B] for q, s in zip(layout.seq, layout.slot)]
            writes.append(self.cache.flat_index(L(blocks), L([s % B for s in layout.slot])))
        queries = QueryMeta(seq=i32(layout.seq), slot=i32(layout.slot), pos=i32(layout.pos),
                            ctx_end=i32(layout.ctx_end), seg_start=i32(layout.seg_start))
        step = PagedStep(queries=queries, groups=groups, layer_group=self.cache.layer_group, block_size=B,
                         abandon=abandon)
        table = torch.cat([t.to(device=dev, dtype=self.dtype) for t in layout.tables]) if layout.tables else None
        embeds = fwd.embed(self.model, SimpleNamespace(ids=L(layout.ids)[None], virt=L(layout.virt)[None],
                                                       virtual_table=table))       # [1, T, D]
        self.cache.write = writes
        with paged_step(step, self.intercept_sdpa), cache_context(self.cache):
            out = fwd.body(self.model)(inputs_embeds=embeds, attention_mask=self._mask,
                                       position_ids=L(layout.pos)[None], cache=self.cache, use_cache=True)
        return out.last_hidden_state[0]                                             # [T, D]

    def _write_prefixes(self, batch: list[Scheduled]) -> None:
        """A prefix-tuning row's key/values into its first P slots (those the prefix cache did not provide)."""
        B = self.block_size
        for item in batch:
            s = item.seq
            P = s.plan.prefix
            if P == 0 or s.prefix_written:
                continue
            first = min(s.blocks.cached_tokens, P)
            if first == P:
                continue
            kv = s.tensors.prefix.to(self.device)                                   # [L, 2, H, P, Dh]
            for g, spec_layers in enumerate(self._group_layers()):
                table = s.blocks.tables[g]
                slots = [p for p in range(first, P) if table[p // B] >= 0]
                if not slots:
                    continue
                blocks = torch.tensor([table[p // B] for p in slots], device=self.device)
                offsets = torch.tensor([p % B for p in slots], device=self.device)
                idx = torch.tensor(slots, device=self.device)
                self.cache.write_prefix(blocks, offsets, kv[:, :, :, idx], spec_layers)

    def _group_layers(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.windows]
        for layer, g in enumerate(self.cache.layer_group):
            out[g].append(layer)
        return out

    # ---- readouts
    def _sample(self, hidden: torch.Tensor, batch: list[Scheduled], layout: StepLayout,
                results: list[RunResult]) -> list[tuple[Sequence, TokenLogprob]]:
        """The next token of every generating row whose last query ran: prefill and decode alike."""
        which = [i for i, item in enumerate(batch) if item.completes and item.seq.samples]
        if not which:
            return []
        seqs = [batch[i].seq for i in which]
        rows = torch.tensor([layout.offsets[i] + batch[i].count - 1 for i in which], device=self.device)
        logits = fwd.logits(self.model, hidden[rows])                                # [m, V]
        self._record(logits, seqs)
        # -- logits processing hook (sampler side): the only call into per-request processors; log-probabilities
        # below stay those of the model's raw logits
        processed = logits if self.processor is None else self.processor.apply(logits, seqs)
        col = lambda f, dt: torch.tensor([f(s) for s in seqs], dtype=dt, device=self.device)  # noqa: E731
        toks = sample(processed, col(lambda s: s.request.sampling.temperature, torch.float32),
                      col(lambda s: s.request.sampling.top_k, torch.long),
                      col(lambda s: s.request.sampling.top_p, torch.float32), col(lambda s: s.seed, torch.long),
                      col(lambda s: len(s.output_ids), torch.long))
        if self.processor is not None:
            self.processor.accept(seqs, toks)
        # -- end of hook
        for i, tok in zip(which, toks.tolist()):
            results[i].token = tok
        return self._sampled_logprobs(logits, toks, seqs)

    def _label_scores(self, hidden: torch.Tensor, batch: list[Scheduled],
                      layout: StepLayout) -> dict[int, list[float]]:
        """Each label's full-verbalizer log-likelihood for classify rows whose prompt completes in this step."""
        rows, toks, owner, label_of, counts = [], [], [], [], []
        for i, item in enumerate(batch):
            s = item.seq
            if not (s.is_classify and item.completes):
                continue
            nt, base = s.plan.num_tokens, layout.offsets[i] - item.start
            k = 0
            for li, label in enumerate(s.plan.labels):
                for j, tok in enumerate(label):   # token j is predicted by the prompt's last query, then its own
                    rows.append(base + (nt - 1 if j == 0 else nt + k + j - 1))
                    toks.append(tok)
                    owner.append(len(counts))
                    label_of.append(sum(counts) + li)
                k += len(label) - 1
            counts.append(len(s.plan.labels))
        if not rows:
            return {}
        dev = self.device
        L = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        queries, which = torch.unique(L(rows), return_inverse=True)                  # [U], [E]
        logp = torch.log_softmax(fwd.logits(self.model, hidden[queries]), dim=-1)     # [U, V]
        tok_logp = logp[which, L(toks)]                                              # [E]
        scores = torch.zeros(sum(counts), dtype=torch.float32, device=dev).index_add_(0, L(label_of), tok_logp)
        per_row = torch.split(scores, counts)
        done = [i for i, item in enumerate(batch) if item.seq.is_classify and item.completes]
        return {i: sc.tolist() for i, sc in zip(done, per_row)}

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: list[Scheduled],
                         layout: StepLayout) -> dict[Sequence, list[TokenLogprob]]:
        """With echo and logprobs: each input token's log-probability given everything before it in the row
        (prefix, virtual tokens, template text, earlier input tokens), from the queries of this step that predict
        one (query p - 1 predicts token p; a chunk covers the tokens whose predicting query it computes)."""
        flat, targets, owners = [], [], []
        out: dict[Sequence, list[TokenLogprob]] = {}
        for i, item in enumerate(batch):
            s = item.seq
            if not (s.request.echo and s.request.logprobs is not None and s.plan.input_span is not None) \
                    or s.prompt_lp_done:
                continue
            start, end = s.plan.input_span
            lo, hi = item.start, item.start + item.count
            mine = out.setdefault(s, [])
            if start == 0 < end and lo == 0:  # a first token that nothing precedes
                mine.append(TokenLogprob(s.plan.ids[0], None))
            for p in range(max(start, 1, lo + 1), min(end, hi + 1)):
                flat.append(layout.offsets[i] + p - 1 - lo)
                targets.append(s.plan.ids[p])
                owners.append(s)
        if not flat:
            return out
        top_n = max(s.request.top_n for s in out)
        L = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        idx, tgt = L(flat), L(targets)
        lp, top_lp, top_ids = [], [], []
        for c in range(0, len(flat), self.LOGPROB_CHUNK):  # bounded memory: [chunk, V] logits at a time
            logits = fwd.logits(self.model, hidden[idx[c:c + self.LOGPROB_CHUNK]])    # [c, V]
            a, b, t = token_logprobs(logits, tgt[c:c + self.LOGPROB_CHUNK], top_n)  # [c], [c, N], [c, N]
            lp.append(a)
            top_lp.append(b)
            top_ids.append(t)
        rows = zip(torch.cat(lp).tolist(), torch.cat(top_lp).tolist(), torch.cat(top_ids).tolist())
        for owner, tok, (v, tl, ti) in zip(owners, targets, rows):
            n = owner.request.top_n
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

    def _record(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        if self.trace is not None:
            for row, s in zip(logits.cpu(), seqs):
                self.trace.setdefault(s.request_id, []).append(row)
