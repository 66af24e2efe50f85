"""PEFT prompt-learning adapters in and out (PROMPT_TUNING, P_TUNING, PREFIX_TUNING), without importing peft.

The layout facts are in shared/docs/peft-format.md. PEFT saves the OUTPUT of its reparameterization networks as one
tensor `prompt_embeddings`, so import needs no encoder: [T, D] for prompt/P-tuning, [T, L*2*H_kv*Dh] for prefix
tuning, column ((2*l + s)*H + h)*Dh + d. Pickle files are never loaded: they execute code on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from prompt_core.fingerprint import ModelFingerprint
from prompt_core.spec import INPUT_SLOT, Label, PromptKind, PromptSpec, PromptTensors

from .errors import InvalidPrompt

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EXTRA_NAME = "promptserve_task.json"  # our template/labels next to an exported adapter; PEFT ignores it
TENSOR_KEY = "prompt_embeddings"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_REFUSAL = ("pickle-based checkpoints run arbitrary code when loaded, so they are never opened; "
                  "save the adapter with safe_serialization=True (adapter_model.safetensors)")

_KINDS = {"PROMPT_TUNING": PromptKind.PROMPT_TUNING, "P_TUNING": PromptKind.P_TUNING,
          "PREFIX_TUNING": PromptKind.PREFIX_TUNING}
_PEFT_TYPES = {v: k for k, v in _KINDS.items()}


def find_pickles(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))


def _expect(cfg: dict, key: str, expected, what: str) -> None:
    found = cfg.get(key)
    if found is not None and found != expected:
        raise InvalidPrompt(f"{CONFIG_NAME}: {key} expected {expected} ({what}), found {found}")


def prefix_from_peft(flat: torch.Tensor, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """[T, L*2*H*Dh] -> [L, 2, H, T, Dh]; column ((2*l + s)*H + h)*Dh + d."""
    T = flat.shape[0]
    return flat.reshape(T, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()  # [L, 2, H, T, Dh]


def prefix_to_peft(prefix: torch.Tensor) -> torch.Tensor:
    """[L, 2, H, T, Dh] -> [T, L*2*H*Dh], the inverse of prefix_from_peft."""
    L, two, H, T, Dh = prefix.shape
    return prefix.permute(3, 0, 1, 2, 4).reshape(T, L * two * H * Dh).contiguous()  # [T, L*2*H*Dh]


def import_peft(directory: Path, fingerprint: ModelFingerprint) -> tuple[PromptSpec, PromptTensors, dict]:
    """Read a PEFT adapter directory into our spec and fp32 CPU tensors, checked against the model's dims.

    Returns (spec, tensors, adapter_config). Raises InvalidPrompt naming expected vs found."""
    directory = Path(directory)
    pickles = find_pickles(directory)
    if pickles:
        raise InvalidPrompt(f"refusing {pickles}: {PICKLE_REFUSAL}")
    try:
        cfg = json.loads((directory / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise InvalidPrompt(f"expected {CONFIG_NAME} in the PEFT adapter, found none") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidPrompt(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise InvalidPrompt(f"{CONFIG_NAME}: expected a JSON object, found {type(cfg).__name__}")
    peft_type = str(cfg.get("peft_type", ""))
    if peft_type not in _KINDS:
        raise InvalidPrompt(f"{CONFIG_NAME}: peft_type expected one of {sorted(_KINDS)}, found {peft_type or None!r}")
    kind = _KINDS[peft_type]
    task_type = cfg.get("task_type") or "CAUSAL_LM"
    if task_type != "CAUSAL_LM":
        raise InvalidPrompt(f"{CONFIG_NAME}: task_type expected CAUSAL_LM (we serve the LM head), found {task_type}")
    _expect(cfg, "num_transformer_submodules", 1, "a decoder-only model")
    T = cfg.get("num_virtual_tokens")
    if not isinstance(T, int) or isinstance(T, bool) or T <= 0:
        raise InvalidPrompt(f"{CONFIG_NAME}: num_virtual_tokens expected a positive integer, found {T!r}")
    fp = fingerprint
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise InvalidPrompt(f"expected {WEIGHTS_NAME} in the PEFT adapter, found none")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if TENSOR_KEY not in keys:
                raise InvalidPrompt(f"{WEIGHTS_NAME}: expected a tensor {TENSOR_KEY!r}, found {sorted(keys)}")
            flat = f.get_tensor(TENSOR_KEY)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise InvalidPrompt(f"{WEIGHTS_NAME} is not a valid safetensors file: {e}") from None
    if not flat.is_floating_point():
        raise InvalidPrompt(f"{WEIGHTS_NAME}: {TENSOR_KEY} expected a floating dtype, found {flat.dtype}")
    if kind is PromptKind.PREFIX_TUNING:
        _expect(cfg, "num_layers", fp.num_layers, "the model's layers")
        _expect(cfg, "num_attention_heads", fp.num_kv_heads, "the model's KV heads, as PEFT rewrites it")
        _expect(cfg, "token_dim", fp.num_kv_heads * fp.head_dim, "KV heads x head dim")
        width = fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim
        if tuple(flat.shape) != (T, width):
            raise InvalidPrompt(
                f"{TENSOR_KEY}: expected shape [{T}, {width}] (T, layers {fp.num_layers} x 2 x KV heads "
                f"{fp.num_kv_heads} x head dim {fp.head_dim}), found {list(flat.shape)}")
        tensors = PromptTensors(prefix=prefix_from_peft(flat.float(), fp.num_layers, fp.num_kv_heads, fp.head_dim))
    else:
        _expect(cfg, "token_dim", fp.hidden_size, "the model's hidden size")
        if tuple(flat.shape) != (T, fp.hidden_size):
            raise InvalidPrompt(f"{TENSOR_KEY}: expected shape [{T}, {fp.hidden_size}] (T, hidden size), "
                                f"found {list(flat.shape)}")
        tensors = PromptTensors(virtual=flat.float().contiguous())  # [T, D]
    template, labels = INPUT_SLOT, ()
    extra = directory / EXTRA_NAME
    if extra.is_file():  # written by our export: keeps the template and labels across a round trip
        try:
            data = json.loads(extra.read_text())
            template = str(data.get("template", INPUT_SLOT))
            labels = tuple(Label(str(x["name"]), str(x["verbalizer"])) for x in data.get("labels", []))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidPrompt(f"{EXTRA_NAME} is malformed: {e}") from None
    try:
        spec = PromptSpec(kind=kind, num_virtual_tokens=T, template=template, labels=labels)
    except ValueError as e:
        raise InvalidPrompt(str(e)) from None
    return spec, tensors, cfg


def _peft_expressible(spec: PromptSpec) -> None:
    if spec.kind is PromptKind.HARD:
        raise InvalidPrompt("a hard prompt has no tensors and cannot be exported as a PEFT adapter")
    seen_text = False
    for part in spec.parts:
        if part.virtual and seen_text:
            raise InvalidPrompt(
                f"PEFT P-tuning only prepends virtual tokens; the template {spec.template!r} places some after text, "
                "which PEFT cannot express")
        seen_text = seen_text or part.virtual == 0


def base_model_name(model: str | None) -> str:
    """`base_model_name_or_path` for exports: a name `AutoPeftModelForCausalLM.from_pretrained(dir)` can load. The
    embedded default is its converted directory (not a hub id: its weights are the dequantized GGUF's, which no hub
    copy matches); a directory is made absolute; a hub id stays as it is."""
    from prompt_core.model import resolve_model_path

    path = resolve_model_path(model)
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def export_peft(directory: Path, spec: PromptSpec, tensors: PromptTensors, fingerprint: ModelFingerprint,
                base_model: str = "") -> None:
    """Write adapter_config.json + adapter_model.safetensors that `PeftModel.from_pretrained` loads.

    The template's text is not part of PEFT: the caller feeds PEFT the filled-in template (our own
    promptserve_task.json beside it keeps template and labels for re-import)."""
    _peft_expressible(spec)
    fp, T = fingerprint, spec.num_virtual_tokens
    cfg: dict = {
        "peft_type": _PEFT_TYPES[spec.kind], "task_type": "CAUSAL_LM", "inference_mode": True,
        "num_virtual_tokens": T, "num_transformer_submodules": 1, "num_layers": fp.num_layers,
        "base_model_name_or_path": base_model or None, "revision": None, "auto_mapping": None,
        "modules_to_save": None,
    }
    if spec.kind is PromptKind.PREFIX_TUNING:
        prefix = tensors.prefix
        want = (fp.num_layers, 2, fp.num_kv_heads, T, fp.head_dim)
        if prefix is None or tuple(prefix.shape) != want:
            raise InvalidPrompt(f"prefix expected shape {list(want)}, found "
                                f"{None if prefix is None else list(prefix.shape)}")
        flat = prefix_to_peft(prefix.detach().float().cpu())  # [T, L*2*H*Dh]
        cfg.update(token_dim=fp.num_kv_heads * fp.head_dim, num_attention_heads=fp.num_kv_heads,
                   prefix_projection=False, encoder_hidden_size=fp.num_kv_heads * fp.head_dim)
    else:
        virtual = tensors.virtual
        if virtual is None or tuple(virtual.shape) != (T, fp.hidden_size):
            raise InvalidPrompt(f"virtual expected shape [{T}, {fp.hidden_size}], found "
                                f"{None if virtual is None else list(virtual.shape)}")
        flat = virtual.detach().float().cpu().contiguous()  # [T, D]
        cfg.update(token_dim=fp.hidden_size, num_attention_heads=fp.num_heads)
        if spec.kind is PromptKind.PROMPT_TUNING:
            cfg.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                       tokenizer_kwargs=None)
        else:
            cfg.update(encoder_reparameterization_type="MLP", encoder_hidden_size=fp.hidden_size,
                       encoder_num_layers=2, encoder_dropout=0.0)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = st_save({TENSOR_KEY: flat}, metadata={"format": "pt"})
    for name, data in ((WEIGHTS_NAME, blob),
                       (CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()),
                       (EXTRA_NAME, (json.dumps({"template": spec.template, "labels": [
                           {"name": lab.name, "verbalizer": lab.verbalizer} for lab in spec.labels]},
                           indent=2) + "\n").encode())):
        with open(directory / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
