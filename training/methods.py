"""What each method trains, and the tensors it hands to the shared forward.

Every method is a small `nn.Module` whose `forward()` returns `(virtual [T, D] | None, prefix [L, 2, H_kv, T, Dh] |
None)`: exactly the `PromptTensors` the server stores. Reparameterization networks (P-tuning's encoder, prefix
tuning's MLP) live only here and in checkpoints; export keeps their output, as PEFT does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prompt_core.fingerprint import model_dims
from prompt_core.layout import encode
from prompt_core.spec import INPUT_SLOT, Label, PromptKind, PromptSpec, PromptTensors, parse_template

from .config import TrainConfig

KIND = {"prompt-tuning": PromptKind.PROMPT_TUNING, "p-tuning": PromptKind.P_TUNING,
        "prefix-tuning": PromptKind.PREFIX_TUNING}


class SoftPrompt(nn.Module):
    spec: PromptSpec

    def forward(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def export_tensors(self) -> PromptTensors:
        """The served tensors, detached, fp32 on the CPU (the encoders are not part of them)."""
        virtual, prefix = self()
        cpu = lambda t: None if t is None else t.detach().float().cpu().contiguous()  # noqa: E731
        return PromptTensors(virtual=cpu(virtual), prefix=cpu(prefix))

    @property
    def peft_representable(self) -> bool:
        """PEFT only prepends virtual tokens; anchors after any text in the template have no PEFT form."""
        seen_text = False
        for part in self.spec.parts:
            if part.virtual and seen_text:
                return False
            seen_text = seen_text or not part.virtual
        return True

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _init_token_ids(cfg: TrainConfig, tokenizer, num: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """PEFT's TEXT init (tokens of a text, repeated and cut to T) or SAMPLE_VOCAB (T random vocabulary ids). [T]"""
    if cfg.init == "sample-vocab":
        return torch.randint(0, vocab, (num,), generator=gen)
    text = cfg.init_text or default_init_text(cfg.template)
    ids = encode(tokenizer, text)
    if not ids:
        raise ValueError(f"--init-text {text!r} gives no tokens")
    ids = (ids * math.ceil(num / len(ids)))[:num]
    return torch.tensor(ids, dtype=torch.long)


def default_init_text(template: str) -> str:
    """The template's own words, without the input slot and markers: a task description for free."""
    text = "".join(p.text for p in parse_template(template) if p.text).replace(INPUT_SLOT, " ").strip()
    return " ".join(text.split()) or "Answer the question."


class PromptTuning(SoftPrompt):
    """T free input embeddings in front of the input."""

    def __init__(self, spec: PromptSpec, cfg: TrainConfig, model, tokenizer, gen: torch.Generator):
        super().__init__()
        self.spec = spec
        table = model.get_input_embeddings().weight.detach()          # [V, D]
        T = spec.num_virtual_tokens
        if cfg.init == "random":  # N(0, std of the real embeddings): PEFT's N(0, 1) is far off the embedding scale
            init = torch.randn(T, table.shape[1], generator=gen) * table.float().std()
        else:
            init = table[_init_token_ids(cfg, tokenizer, T, table.shape[0], gen).to(table.device)].float()
        self.embedding = nn.Parameter(init.clone().float())            # [T, D]

    def forward(self):
        return self.embedding, None


class PTuning(SoftPrompt):
    """PEFT's PromptEncoder: an embedding per virtual token through an MLP or a bidirectional LSTM + MLP.
    Parameter names follow PEFT (embedding, mlp_head, lstm_head)."""

    def __init__(self, spec: PromptSpec, cfg: TrainConfig, model, gen: torch.Generator):
        super().__init__()
        self.spec = spec
        D, T, H = model.config.hidden_size, spec.num_virtual_tokens, cfg.encoder_hidden
        self.encoder_type = cfg.encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            self.embedding = nn.Embedding(T, D)
            if cfg.encoder == "lstm":
                self.lstm_head = nn.LSTM(input_size=D, hidden_size=H, num_layers=2, bidirectional=True,
                                         batch_first=True)
                self.mlp_head = nn.Sequential(nn.Linear(2 * H, 2 * H), nn.ReLU(), nn.Linear(2 * H, D))
            else:
                self.mlp_head = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(),
                                              nn.Linear(H, D))

    def forward(self):
        x = self.embedding.weight[None]                                # [1, T, D]
        if self.encoder_type == "lstm":
            x = self.lstm_head(x)[0]                                   # [1, T, 2H]
        return self.mlp_head(x)[0], None                               # [T, D]


class PrefixTuning(SoftPrompt):
    """T key/value pairs per layer. Without reparameterization they are free tensors, initialised from the model's
    own keys/values over the init tokens (real activations train far better than noise); with it, PEFT's
    PrefixEncoder Embedding -> Linear -> Tanh -> Linear produces them."""

    def __init__(self, spec: PromptSpec, cfg: TrainConfig, model, tokenizer, gen: torch.Generator):
        super().__init__()
        self.spec = spec
        _, L, _, Hkv, Dh = model_dims(model)
        self.shape = (L, 2, Hkv, Dh)
        T = spec.num_virtual_tokens
        self.projection = cfg.prefix_projection
        if self.projection:
            token_dim = Hkv * Dh   # PEFT's GQA rewrite: token_dim = kv_heads * head_dim
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                self.embedding = nn.Embedding(T, token_dim)
                self.transform = nn.Sequential(nn.Linear(token_dim, cfg.encoder_hidden), nn.Tanh(),
                                               nn.Linear(cfg.encoder_hidden, L * 2 * token_dim))
        elif cfg.init == "random":
            self.prefix = nn.Parameter(torch.randn(L, 2, Hkv, T, Dh, generator=gen))
        else:
            ids = _init_token_ids(cfg, tokenizer, T, model.config.vocab_size, gen)
            self.prefix = nn.Parameter(_activations(model, ids))

    def forward(self):
        if not self.projection:
            return None, self.prefix
        flat = self.transform(self.embedding.weight)                   # [T, L*2*H*Dh], PEFT's column layout
        L, two, H, Dh = self.shape
        return None, flat.view(-1, L, two, H, Dh).permute(1, 2, 3, 0, 4)  # [L, 2, H, T, Dh]


@torch.no_grad()
def _activations(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's cached keys/values over `ids` at positions 0..T-1. [L, 2, H_kv, T, Dh]"""
    device = model.get_input_embeddings().weight.device
    out = model(input_ids=ids[None].to(device), use_cache=True)
    cache = out.cache
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # each [2, H, T, Dh]
    return torch.stack(layers).float().cpu().clone()


def make_spec(cfg: TrainConfig, labels: tuple[Label, ...]) -> PromptSpec:
    """The PromptSpec of the run; the virtual-token count comes from the markers when they place them."""
    marked = sum(p.virtual for p in parse_template(cfg.template))
    T = cfg.virtual_tokens or marked or 8
    kind = KIND.get(cfg.method, KIND["prompt-tuning"])  # "auto": its candidates share everything but the kind
    return PromptSpec(kind=kind, num_virtual_tokens=T, template=cfg.template, labels=labels)


def build_method(cfg: TrainConfig, spec: PromptSpec, model, tokenizer) -> SoftPrompt:
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.method == "prompt-tuning":
        method = PromptTuning(spec, cfg, model, tokenizer, gen)
    elif cfg.method == "p-tuning":
        method = PTuning(spec, cfg, model, gen)
    else:
        method = PrefixTuning(spec, cfg, model, tokenizer, gen)
    if cfg.init_from is not None:
        start_from(method, cfg.init_from)
    return method


def start_from(method: SoftPrompt, path) -> None:
    """Continue a trained prompt: its served tensor (a prompt.safetensors) becomes the starting parameters."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise ValueError(f"--init-from {path}: not a readable safetensors file ({e})") from None
    name, param = ("virtual", method.embedding) if isinstance(method, PromptTuning) else ("prefix", method.prefix)
    if name not in tensors:
        raise ValueError(f"--init-from {path}: expected a {name!r} tensor, found {sorted(tensors)}")
    if tuple(tensors[name].shape) != tuple(param.shape):
        raise ValueError(f"--init-from {path}: {name} has shape {list(tensors[name].shape)}, this run needs "
                         f"{list(param.shape)} (the same virtual tokens and base model)")
    with torch.no_grad():
        param.copy_(tensors[name].to(param.device, param.dtype))
