"""Self-generated calibration data (Norm Tweaking, METHODS.md §2.5): the float model writes its own text.

Per sample ``i`` of ``n``:

1. the first token is drawn uniformly from the *language-filtered* vocabulary: tokens whose decoded text,
   stripped of surrounding whitespace, is non-empty, alphabetic (``str.isalpha``) and written only in the
   scripts of ``scripts`` (default Latin), special tokens excluded — [NQ]; the paper's language-category
   filter itself is [UNVERIFIED]. First tokens are distinct while ``n`` does not exceed the filtered
   vocabulary (drawn without replacement) [NQ];
2. the next ``3 + i % 3`` tokens (3, 4, 5 rotating across samples) are greedy (top-1);
3. the rest, up to ``seqlen``, are sampled from the model's softmax (temperature 1, no top-k/top-p).

[NQ] EOS and every other special token are given probability 0 at every step (the softmax is renormalized
over the rest), so each sample is ``seqlen`` tokens of one continuous text and there is no early stop or
padding. Tokens past the tokenizer's length (padding rows of the embedding) are excluded the same way.

Sampling is inverse-CDF with uniforms drawn up front from a CPU generator seeded with ``seed``
(``[n, seqlen]``), so a sample does not depend on the batch it is generated in (up to the floating-point
differences of batched kernels) and the result is reproducible from ``seed`` on one device.
Generation is batched with the model's KV cache (a manual loop over ``model(...)``: one forward per token).

The result ``[n, seqlen]`` is cached to
``<cache_dir>/selfgen/<model>-<fingerprint>-n<n>-L<seqlen>-s<seed>-<scripts>-v<format>.pt``
(default cache dir: ``$NORMQUANT_CACHE`` or ``~/.cache/normquant``) together with the seed, the scripts and the
first tokens; a later call with the same model weights, tokenizer, ``n``, ``seqlen``, ``seed`` and scripts
reloads it without running the model.

>>> ids = generate_calibration(model, tokenizer, n=128, seqlen=2048, seed=0)  # doctest: +SKIP
>>> ids.shape  # doctest: +SKIP
torch.Size([128, 2048])
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import unicodedata
from pathlib import Path

import torch
from torch import nn

from normquant.data.text import DataError
from normquant.models.arch import cache_argument
from normquant.io import atomic_file
from normquant.progress import progress_bar

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the generation procedure changes: old cache files are then not reused

# Unicode character-name prefixes of the scripts that need more than the name's first word.
_SCRIPT_PREFIXES: dict[str, tuple[str, ...]] = {
    "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "IDEOGRAPHIC", "BOPOMOFO"),
    "han": ("CJK",),
    "kana": ("HIRAGANA", "KATAKANA"),
}


def _in_scripts(ch: str, scripts: set[str]) -> bool:
    name = unicodedata.name(ch, "")
    for s in scripts:
        prefixes = _SCRIPT_PREFIXES.get(s)
        if prefixes is not None:
            if name.startswith(prefixes):
                return True
        elif name.split(" ", 1)[0].lower() == s:
            return True
    return False


def passes_language_filter(text: str, scripts=("Latin",)) -> bool:
    """True for decoded token text that is alphabetic and written in ``scripts`` only (surrounding spaces ignored).

    Script names are matched case-insensitively against the first word of the Unicode character name
    (``Latin``, ``Cyrillic``, ``Greek``, ``Arabic``, ...); ``CJK`` means Han, kana and Hangul.

    >>> passes_language_filter(" the"), passes_language_filter("123"), passes_language_filter("мир")
    (True, False, False)
    >>> passes_language_filter("мир", scripts=("Latin", "Cyrillic"))
    True
    """
    s = text.strip()
    wanted = {x.lower() for x in scripts}
    return bool(s) and s.isalpha() and all(_in_scripts(ch, wanted) for ch in s)


def _special_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
            v = getattr(cfg, attr, None) if cfg is not None else None
            ids.update(v if isinstance(v, (list, tuple)) else [] if v is None else [v])
    return {int(i) for i in ids}


def _vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
        else model.config.vocab_size


def allowed_first_tokens(model: nn.Module, tokenizer, scripts=("Latin",)) -> torch.Tensor:
    """Ids (``[k]``, ascending) that may start a sample: the language filter, no special tokens."""
    special = _special_ids(model, tokenizer)
    limit = min(_vocab_size(model), len(tokenizer))
    cand = [i for i in range(limit) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in cand], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    keep = [i for i, t in zip(cand, texts) if passes_language_filter(t, scripts)]
    if not keep:
        raise DataError(f"no token of the vocabulary passes the language filter for scripts {tuple(scripts)}; "
                        "self-generated calibration needs alphabetic first tokens in one of these scripts")
    return torch.tensor(keep, dtype=torch.long)


def model_fingerprint(model: nn.Module, tokenizer=None) -> str:
    """Short hash of the model config, a sample of every parameter tensor and the tokenizer (cache key).

    Reads the first 16 values of each tensor of the state dict, so it is cheap on a large model.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((config.to_json_string(use_diff=False) if config is not None else type(model).__name__).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        x = t.detach()
        while x.dim() > 1:  # first row of the first row ...: a view, no copy of a large tensor
            x = x[0]
        h.update(x.reshape(-1)[:16].to("cpu", torch.float64).numpy().tobytes())
    if tokenizer is not None:
        h.update(f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}".encode())
        h.update(str(sorted(getattr(tokenizer, "all_special_ids", []) or [])).encode())
    return h.hexdigest()[:16]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("NORMQUANT_CACHE", Path.home() / ".cache" / "normquant"))


def cache_path(model: nn.Module, tokenizer, n: int, seqlen: int, seed: int, scripts=("Latin",),
               cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`generate_calibration` stores (and looks for) this data set."""
    name = getattr(getattr(model, "config", None), "name_or_path", "") or getattr(model.config, "model_type", "model")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-")[-60:] or "model"
    script_key = "+".join(sorted(s.lower() for s in scripts))
    base = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    key = f"{name}-{model_fingerprint(model, tokenizer)}-n{n}-L{seqlen}-s{seed}-{script_key}-v{FORMAT}"
    return base / "selfgen" / f"{key}.pt"


def _read_cache(path: Path, n: int, seqlen: int, seed: int, vocab: int) -> torch.Tensor | None:
    """The cached ids ``[n, seqlen]`` when the file at ``path`` is intact and is what was asked for; else None
    (a warning, the file removed: the data is generated again and the cache rewritten)."""
    problem = None
    try:
        record = torch.load(path, weights_only=True)
    except Exception as e:  # truncated, not a torch file, written by something else
        record, problem = None, f"unreadable ({type(e).__name__})"
    if problem is None:
        ids = record.get("input_ids") if isinstance(record, dict) else None
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or tuple(ids.shape) != (n, seqlen):
            problem = "input_ids missing or of the wrong shape/dtype"
        elif (record.get("seed"), record.get("n"), record.get("seqlen"), record.get("format")) != (seed, n, seqlen,
                                                                                                     FORMAT):
            problem = "made for another seed, size or format"
        elif ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            problem = "token ids outside the vocabulary"
    if problem is None:
        return ids
    log.warning("self-generated calibration cache %s is %s; generating it again", path, problem)
    path.unlink(missing_ok=True)
    return None


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _generate_batch(model: nn.Module, first: torch.Tensor, n_greedy: torch.Tensor, uniforms: torch.Tensor,
                    banned: torch.Tensor) -> torch.Tensor:
    """One batch: ``first`` ``[b]``, ``n_greedy`` ``[b]``, ``uniforms`` ``[b, seqlen]`` -> ids ``[b, seqlen]``.

    Step ``j`` (1..seqlen-1) feeds the last token with the KV cache; token ``j`` is the argmax while
    ``j <= n_greedy`` and otherwise the inverse-CDF sample ``min{v : cdf_v > u_j · cdf_V}``, which never picks a
    token of probability 0 (``banned`` ``[V]`` are given probability 0).
    """
    device = _model_device(model)
    b, seqlen = uniforms.shape
    ids = torch.empty(b, seqlen, dtype=torch.long, device=device)
    ids[:, 0] = first.to(device)
    n_greedy, uniforms, banned = n_greedy.to(device), uniforms.to(device, torch.float64), banned.to(device)
    key = cache_argument(model)
    past, cur = None, ids[:, :1]
    for j in range(1, seqlen):
        out = model(input_ids=cur, use_cache=True, **{key: past})
        past = out[key]
        logits = out.logits[:, -1].float()  # [b, V]
        logits = logits.masked_fill(banned[: logits.shape[-1]], float("-inf"))
        greedy = logits.argmax(dim=-1)  # [b]
        cdf = torch.softmax(logits.double(), dim=-1).cumsum(dim=-1)  # [b, V]
        target = (uniforms[:, j] * cdf[:, -1]).unsqueeze(1)  # [b, 1]
        sampled = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(cdf.shape[-1] - 1)
        ids[:, j] = torch.where(j <= n_greedy, greedy, sampled)
        cur = ids[:, j:j + 1]
    return ids.cpu()


def generate_calibration(model: nn.Module, tokenizer, n: int = 128, seqlen: int = 2048, seed: int = 0,
                         scripts=("Latin",), cache_dir: str | os.PathLike | None = None, *, batch_size: int = 32,
                         use_cache: bool = True, progress: bool = True) -> torch.Tensor:
    """``n`` self-generated samples of ``seqlen`` tokens, ``LongTensor [n, seqlen]`` (see the module docstring).

    ``cache_dir``: where the ``selfgen/`` cache lives (default ``$NORMQUANT_CACHE`` or ``~/.cache/normquant``);
    ``use_cache=False`` neither reads nor writes it. ``batch_size`` samples are generated together (the KV cache
    of one 2048-token sample of a 7B fp16 model is ~1 GiB: lower it for large models).
    """
    if n <= 0 or seqlen < 2:
        raise DataError(f"need n >= 1 and seqlen >= 2, got n={n}, seqlen={seqlen}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise DataError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {max_pos}")
    path = cache_path(model, tokenizer, n, seqlen, seed, scripts, cache_dir) if use_cache else None
    if path is not None and path.is_file():
        ids = _read_cache(path, n, seqlen, seed, _vocab_size(model))
        if ids is not None:
            log.info("self-generated calibration data reloaded from %s (seed %d)", path, seed)
            return ids

    g = torch.Generator().manual_seed(seed)
    allowed = allowed_first_tokens(model, tokenizer, scripts)  # [k]
    pick = torch.randperm(len(allowed), generator=g)[:n] if n <= len(allowed) else \
        torch.randint(len(allowed), (n,), generator=g)
    first = allowed[pick]  # [n]
    uniforms = torch.rand(n, seqlen, generator=g, dtype=torch.float64)  # [n, seqlen]
    n_greedy = 3 + torch.arange(n) % 3  # [n]: 3, 4, 5, 3, ...
    V = _vocab_size(model)
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[i for i in _special_ids(model, tokenizer) if 0 <= i < V]] = True
    banned[len(tokenizer):] = True

    was_training = model.training
    model.eval()
    try:
        chunks = []
        for i in progress_bar(range(0, n, batch_size), desc="self-generating", unit="batch", enabled=progress):
            s = slice(i, i + batch_size)
            chunks.append(_generate_batch(model, first[s], n_greedy[s], uniforms[s], banned))
    finally:
        model.train(was_training)
    ids = torch.cat(chunks)  # [n, seqlen]

    if path is not None:
        record = {"input_ids": ids, "seed": seed, "n": n, "seqlen": seqlen, "scripts": list(scripts),
                  "first_tokens": first, "n_greedy": n_greedy, "format": FORMAT,
                  "fingerprint": model_fingerprint(model, tokenizer)}
        with atomic_file(path) as tmp:
            torch.save(record, tmp)
        log.info("self-generated calibration data (seed %d) saved to %s", seed, path)
    return ids
