"""What a serving stack computes with an export, next to what normquant measured: the ``serving`` section.

normquant's fake-quant arithmetic is compressed-tensors' (weights: stored integers and scales, dequantized as
``s * (q - z)`` by both; input activations: :func:`normquant.quant.primitives.fake_quantize_activation`), so
for the schemes it exports, ``transformers`` + ``compressed-tensors`` compute the same logits as
``normquant eval`` does on the export (``tests/test_parity.py``, ``eval/parity_smollm2.md``). Some exports
cannot be run that way, and :func:`serving_notes` says which and why, in ``config.json["normquant"]["serving"]``:

* ``parity: exact``: ``AutoModelForCausalLM.from_pretrained(path)`` computes normquant's model;
* ``parity: exact-with-dequantize``: only with ``quantization_config=CompressedTensorsConfig(dequantize=True)``
  — asymmetric packed channel/group weights: compressed-tensors 0.20's meta-device compress (which transformers
  runs before loading) leaves their zero points unpacked while the checkpoint packs them, so the default route
  refuses the shapes; dequantizing at load is exact for weight-only layers;
* ``parity: approximate`` (``approximate-with-dequantize``): a float16/bfloat16 model; compressed-tensors keeps
  the stored float32 scales in the model's dtype, which moves dequantized weights by up to one ulp of that dtype
  (measured on a tiny bfloat16 llama: weights 2.4e-4, logits 3.9e-3); exact in float32;
* ``...-with-transforms`` (``exact-with-transforms``, ``exact-with-dequantize-and-transforms``, ...): the export
  carries online transforms (``transform_config``, :mod:`normquant.export.transforms`), which transformers 5.24
  does not apply: load as above, then :func:`~normquant.export.transforms.apply_transforms` (compressed-tensors'
  ``apply_transform_config`` and the stored matrices); exact in float32 (``tests/test_export_transforms.py``);
* ``parity: none``: no transformers route computes it (tensors the architecture has no parameter for, a dynamic
  ``clip_ratio`` compressed-tensors has no field for, asymmetric packed weights with quantized inputs, a KV
  cache it does not quantize). ``notes`` name the modules.

A quantized KV cache (``scheme.kv_cache``) travels as ``config.json`` ``normquant.kv_cache`` (and its
compressed-tensors args as ``normquant.kv_cache_scheme`` where they exist), never as
``quantization_config.kv_cache_scheme``: vLLM 0.33 refuses to load any kv_cache_scheme but 8-bit float, and
compressed-tensors 0.20.1 hooks no attention module under transformers 5.24 (its forward takes ``cache``, not
``past_key_values``: ``tests/test_parity.py`` checks that writing one changes nothing there). Such an export is
``parity: none``; ``normquant eval`` applies the cache.

``vllm`` lists what vLLM (0.33.0's compressed-tensors loader, read, not run: no GPU here) cannot load (no scheme
takes the group: asymmetric W8A8 weights, per-tensor packed weights, packed weights with quantized inputs) or
computes differently: one input scale per fused q/k/v and gate/up module (the last shard loaded wins; noted when
normquant's differ) and static asymmetric zero points recomputed by truncation (``scripts/export_layout.py``
checks every exported tensor against the parameters vLLM creates: ``eval/export_layout.md``).

>>> serving_notes(model, qconfig, tensors)                                        # doctest: +SKIP
{'parity': 'exact', 'load': 'AutoModelForCausalLM.from_pretrained(path)', 'notes': [], 'vllm': []}
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normquant.export.schema import PACK_QUANTIZED
from normquant.export.transforms import read_transform_config, transform_tensor_names
from normquant.quant.real import QUANTIZED_LINEARS
from normquant.quant.kv import KVCacheSpec, kv_cache_of
from normquant.quant.prefix import prefix_of

LOAD_DEFAULT = "AutoModelForCausalLM.from_pretrained(path)"
LOAD_DEQUANTIZE = ("AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig("
                   "dequantize=True))")
APPLY_TRANSFORMS = "normquant.export.transforms.apply_transforms(model, path)"
#: linears vLLM fuses into one module (with one input scale), by leaf name
VLLM_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
QUANT_KEYS = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "input_scale",
              "input_zero_point")


def _names(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def vanilla_keys(model: nn.Module) -> set[str] | None:
    """State-dict keys (tied aliases dropped) of the model's class built from its config, on the meta device."""
    try:
        with torch.device("meta"):
            vanilla = type(model)._from_config(model.config)
    except Exception:  # not a transformers model (or not buildable from its config): nothing to compare
        return None
    every = dict(vanilla.state_dict(keep_vars=True))
    unique = {n for n, _ in vanilla.named_parameters()} | {n for n, _ in vanilla.named_buffers()}
    return {k for k in every if k in unique}


def _kv_cache_notes(kv: KVCacheSpec) -> list[str]:
    """What serving stacks do with the export of a model whose KV cache is ``kv`` (parity: none)."""
    vllm = ("vLLM's own int8 per-token-head cache (--kv-cache-dtype int8_per_token_head) is the nearest: "
            "absmax/127 scales, rounding half away from zero" if kv.method == "rtn" and kv.bits == 8 else
            "vLLM has no such cache")
    return [f"KV cache {kv.short()} (config.json normquant.kv_cache): quantization_config.kv_cache_scheme is left "
            "null (vLLM 0.33 refuses int KV schemes; compressed-tensors 0.20.1 applies none under transformers "
            f"5.24), so transformers runs this export with a float KV cache; {vllm}; normquant eval applies it"]


def serving_notes(model: nn.Module, qconfig: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``serving`` section for an export of ``model`` with ``qconfig`` and checkpoint ``tensors``."""
    notes: list[str] = []
    parity = "exact"
    quantized = {name for g in qconfig["config_groups"].values() for name in g["targets"]}
    transforms = read_transform_config(qconfig, "quantization_config")
    if transforms:
        targets = [t for targets, _ in transforms.values() for t in targets]
        notes.append(f"online Hadamard transforms on {_names(targets)} are in quantization_config.transform_config, "
                     "which transformers' compressed-tensors loader ignores (checked on 5.24; huggingface/transformers"
                     f"#42887 would apply it): after from_pretrained, call {APPLY_TRANSFORMS}")
    for group_name, group in qconfig["config_groups"].items():
        w, a = group.get("weights"), group.get("input_activations")
        fmt = group.get("format") or qconfig["format"]
        if w and not w["symmetric"] and fmt == PACK_QUANTIZED and w["strategy"] in ("channel", "group"):
            if a is None:
                parity = "exact-with-dequantize" if parity == "exact" else parity
                notes.append(f"{group_name}: asymmetric packed {w['strategy']} weights load in transformers only with "
                             "CompressedTensorsConfig(dequantize=True) (compressed-tensors 0.20's meta compress "
                             "leaves packed zero points unpacked); that route is exact for weight-only layers")
            else:
                parity = "none"
                notes.append(f"{group_name}: asymmetric packed {w['strategy']} weights with quantized inputs: the "
                             "default transformers route cannot load them and dequantize=True drops the activation "
                             "quantization")
    clipped = sorted({f"{n}" for n, m in model.named_modules()
                      if isinstance(m, QUANTIZED_LINEARS) and m.input_quant is not None and m.input_quant.spec.dynamic
                      and m.input_quant.spec.clip_ratio < 1})
    if clipped:
        parity = "none"
        notes.append(f"dynamic input activations with clip_ratio < 1 on {_names(clipped)}: compressed-tensors has no "
                     "clip ratio and quantizes the full range")
    prefix = prefix_of(model)
    if prefix is not None:
        parity = "none"
        notes.append(f"PrefixQuant prefix {prefix.tolist()} (config.json normquant.prefix_ids): its positions must "
                     "pass every activation quantizer in float (a KV cache computed once); compressed-tensors "
                     "quantizes every position. normquant eval on this export applies it")
    vanilla = vanilla_keys(model)
    if vanilla is not None:
        prefixes = tuple(f"{n}." for n in quantized)
        matrices = transform_tensor_names(transforms)
        extra = sorted(k for k in tensors if k not in vanilla and k not in matrices
                       and not (k.startswith(prefixes) and k.rpartition(".")[2] in QUANT_KEYS))
        if extra:  # inside quantized layers (RepQuant's created biases): normquant loads them, transformers drops them
            parity = "none"
            notes.append(f"{len(extra)} tensors {type(model).__name__} has no parameter for ({_names(extra)}): "
                         "transformers drops them (RepQuant's created biases)")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    kv = kv_cache_of(model)
    if kv is not None:
        parity = "none"
        notes += _kv_cache_notes(kv)
    if dtype in (torch.float16, torch.bfloat16) and parity != "none":
        parity = {"exact": "approximate", "exact-with-dequantize": "approximate-with-dequantize"}[parity]
        name = str(dtype).replace("torch.", "")
        notes.append(f"the model is {name}: compressed-tensors holds the float32 scales in {name}, so dequantized "
                     f"weights can differ by one {name} ulp from normquant's (parity is exact in float32)")
    load = {"exact": LOAD_DEFAULT, "approximate": LOAD_DEFAULT, "exact-with-dequantize": LOAD_DEQUANTIZE,
            "approximate-with-dequantize": LOAD_DEQUANTIZE}.get(parity)
    if transforms and load is not None:
        parity += "-and-transforms" if "-with-" in parity else "-with-transforms"
        load = f"{load}, then {APPLY_TRANSFORMS}"
    return {"parity": parity, "engine": "transformers + compressed-tensors", "load": load, "notes": notes,
            "vllm": vllm_notes(model, qconfig)}


def vllm_scheme(group: dict) -> tuple[str | None, str]:
    """``(scheme, why not)``: the vLLM 0.33.0 compressed-tensors scheme that takes a config ``group`` (its routing in
    ``compressed_tensors.py``, read not run), or None and why no int scheme does."""
    w, a, fmt = group["weights"], group["input_activations"], group["format"]
    if w is None:
        return None, "activation-only quantization has no int scheme"
    if fmt == "int-quantized":
        if w["num_bits"] != 8 or not w["symmetric"] or w["strategy"] not in ("tensor", "channel"):
            return None, "W8A8 int8 needs 8-bit symmetric per-tensor or per-channel weights"
        if a is None or a["num_bits"] != 8 or (a["strategy"], a["dynamic"]) not in (("token", True),
                                                                                      ("tensor", False)):
            return None, "W8A8 int8 needs 8-bit dynamic per-token or static per-tensor inputs"
        return "CompressedTensorsW8A8Int8", ""
    if fmt == "pack-quantized":
        if a is not None:
            return None, "packed weights with quantized inputs have no int scheme"
        if w["strategy"] not in ("channel", "group"):
            return None, f"WNA16 needs per-channel or group weights, not {w['strategy']}"
        return "CompressedTensorsWNA16", ""
    return None, f"format {fmt} has no int scheme"


def vllm_notes(model: nn.Module, qconfig: dict[str, Any]) -> list[str]:
    """Where vLLM (0.33.0, from reading its compressed-tensors loader; not run here) computes something else, or
    cannot load the export."""
    notes = []
    for name, group in qconfig["config_groups"].items():
        scheme, why = vllm_scheme({**group, "format": group.get("format") or qconfig["format"]})
        if scheme is None:
            notes.append(f"{name} ({_names(group['targets'])}): no vLLM scheme loads it ({why})")
    static_asym = sorted(n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS) and m.input_quant
                         is not None and not m.input_quant.spec.dynamic and not m.input_quant.spec.symmetric)
    if static_asym:
        notes.append(f"static asymmetric input quantization on {_names(static_asym)}: vLLM rebuilds the range from "
                     "input_scale / input_zero_point and recomputes the zero point by truncation, which can sit one "
                     "level from normquant's")
    fused = {}  # vLLM fuses q/k/v and gate/up into one module with one input scale: the last shard loaded wins
    for n, m in model.named_modules():
        if isinstance(m, QUANTIZED_LINEARS) and m.input_quant is not None and m.input_quant.scale is not None:
            parent, _, leaf = n.rpartition(".")
            if leaf in VLLM_FUSED:
                fused.setdefault((parent, VLLM_FUSED[leaf]), set()).add(tuple(m.input_quant.scale.flatten().tolist()))
    unequal = sorted(f"{parent}.{g}" for (parent, g), scales in fused.items() if len(scales) > 1)
    if unequal:
        notes.append(f"static input scales differ inside fused modules {_names(unequal)}: vLLM keeps one per fused "
                     "module (the last shard loaded)")
    return notes
