"""Online input transforms <-> compressed-tensors ``transform_config`` entries and the matrices they need.

**What compressed-tensors 0.20.1 parses** (``compressed_tensors.transform``, pydantic, unknown keys refused at
every level): ``quantization_config.transform_config`` is a ``TransformConfig`` ``{"config_groups": {name:
TransformScheme}}``; a scheme is ``{type, apply: [TransformArgs], randomize, requires_grad, head_dim, precision}``
and an apply entry ``{targets, location, inverse, ignore}`` (targets: module names, ``re:`` patterns or class
names). Locations: ``input`` / ``output`` run online (forward hooks; ``input`` is prepended, so it runs before the
input quantizer), ``weight_input`` / ``weight_output`` are fused into the weight when applied, ``q_attn`` /
``k_cache`` hook attention. Types: ``hadamard`` (Sylvester, powers of two only, built at load), ``random-hadamard``
(a Hadamard of its own K-matrix library — K = 192 for 1536, not normquant's 12 — with random signs from an
unseeded generator), ``random-matrix`` (any invertible matrix, not normalized). A Hadamard transform computes
``(x.to(precision) @ W) / √b`` with ``W`` the ±1 matrix of size ``b`` (``head_dim``: block-diagonal with blocks
of ``b``; ``inverse``: ``Wᵀ``), online in ``precision`` (float32 by default), fused ones in float64.

**How it is loaded**: ``apply_transform_config(model, config)`` creates one weight per (scheme, size), shared by
every target, as ``<target>.<scheme>_<location>.weight``; llm-compressor checkpoints store it once (tied), vLLM
loads it from the checkpoint and multiplies by it (dense for every type but ``hadamard``, which has a Sylvester
kernel). transformers 5.24 does not apply ``transform_config`` (its compressed-tensors quantizer drops it;
huggingface/transformers#42887 would apply it before the weights load): :func:`apply_transforms` does that work on
a model loaded with ``from_pretrained``.

**normquant's choice: the matrix is shipped, not rebuilt.** compressed-tensors would build a different Hadamard,
so each group of :class:`~normquant.quant.hadamard.OnlineHadamard` transforms of one size becomes a scheme
``online_hadamard_<n>``: ``type: random-hadamard`` (the type whose weight every loader takes from the checkpoint),
one ``location: input`` entry naming its layers, ``head_dim`` = the Hadamard block (``n``, or the fallback's
block; it also lets compressed-tensors size a GPT-2 ``Conv1D``), ``precision`` float32 (float64 for float64
models), and its ±1 matrix (:func:`~normquant.quant.hadamard.hadamard_signs`) stored once, under the first target,
as a tied llm-compressor weight is. Only the online half is written: the offline halves (R4's ``W Tᵀ`` on
``down_proj``, R1, R2) are in the weights already, and a loader must not apply them again. OnlineHadamard computes
compressed-tensors' arithmetic op for op, so the logits are bit-identical (``tests/test_export_transforms.py``).
Any other online transform is refused by name.

>>> config, tensors = transform_config(model)                                   # doctest: +SKIP
>>> config["config_groups"]["online_hadamard_1536"]["apply"][0]["location"]      # doctest: +SKIP
'input'
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normquant.export.schema import ExportError
from normquant.messages import one_line, show
from normquant.quant.hadamard import HadamardPlan, OnlineHadamard, hadamard_plan, hadamard_signs
from normquant.quant.linear import QuantLinear, is_linear
from normquant.quant.real import QUANTIZED_LINEARS

TRANSFORM_TYPE = "random-hadamard"
LOCATION = "input"
PRECISIONS = ("torch.float32", "torch.float64")


def scheme_name(plan: HadamardPlan) -> str:
    return f"online_hadamard_{plan.n}"


def weight_name(scheme: str, first_target: str) -> str:
    """Checkpoint name of a scheme's matrix: compressed-tensors' ``<target>.<scheme>_<location>.weight``."""
    return f"{first_target}.{scheme}_{LOCATION}.weight"


def transform_config(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(transform_config, tensors)`` of the model's online input transforms (``({}, {})`` when it has none).

    Refuses (:class:`ExportError`, naming the layer) a transform with no compressed-tensors form."""
    groups: dict[HadamardPlan, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZED_LINEARS) or module.input_transform is None:
            continue
        transform = module.input_transform
        if type(transform) is not OnlineHadamard:
            raise ExportError(f"cannot export {name}: its online input transform {type(transform).__name__} has no "
                              "compressed-tensors transform_config form (normquant writes OnlineHadamard, the "
                              "rotation's R4); remove it or evaluate in normquant")
        groups.setdefault(transform.plan, []).append(name)
    if not groups:
        return {}, {}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    precision = torch.float64 if dtype == torch.float64 else torch.float32  # what OnlineHadamard computes in
    config_groups, tensors = {}, {}
    for plan, targets in groups.items():
        scheme = scheme_name(plan)
        config_groups[scheme] = {
            "type": TRANSFORM_TYPE,
            "apply": [{"targets": targets, "location": LOCATION, "inverse": False, "ignore": []}],
            "randomize": False,
            "requires_grad": False,
            "head_dim": plan.block,
            "precision": str(precision),
        }
        tensors[weight_name(scheme, targets[0])] = hadamard_signs(plan).to(precision).contiguous()  # [b, b], ±1
    return {"config_groups": config_groups}, tensors


# ---------------------------------------------------------------------------------------------------- reload
def read_transform_config(qconfig: dict, where: str) -> dict[str, tuple[list[str], int]]:
    """``{scheme: (targets, head_dim)}`` of an export's ``transform_config``, after checking that it is what
    :func:`transform_config` writes (anything else is an :class:`ExportError` naming the key)."""
    tconfig = qconfig.get("transform_config") or {}
    groups = tconfig.get("config_groups", {}) if isinstance(tconfig, dict) else None
    if not isinstance(groups, dict):
        raise ExportError(f"{where}: quantization_config.transform_config must be {{'config_groups': {{...}}}} (got "
                          f"{show(tconfig)}); re-export")
    out = {}
    for scheme, s in groups.items():
        at = f"{where}: quantization_config.transform_config.config_groups.{scheme}"
        apply = s.get("apply") if isinstance(s, dict) else None
        entry = apply[0] if isinstance(apply, list) and len(apply) == 1 and isinstance(apply[0], dict) else {}
        targets = entry.get("targets")
        head_dim = s.get("head_dim") if isinstance(s, dict) else None
        written = (isinstance(s, dict) and s.get("type") == TRANSFORM_TYPE and entry.get("location") == LOCATION
                   and entry.get("inverse", False) is False and not entry.get("ignore")
                   and not s.get("randomize", False) and not s.get("requires_grad", False)
                   and s.get("precision", "torch.float32") in PRECISIONS)
        if not written:
            raise ExportError(f"{at} is not a transform normquant writes (one '{LOCATION}' entry of type "
                              f"'{TRANSFORM_TYPE}', not inverse, randomized or trainable): {one_line(s, 200)}; "
                              "re-export")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ExportError(f"{at}.apply[0].targets must be a non-empty list of module names (got {show(targets)})")
        if type(head_dim) is not int or head_dim < 1:
            raise ExportError(f"{at}.head_dim must be a positive integer (got {show(head_dim)}); re-export")
        out[scheme] = (targets, head_dim)
    return out


def transform_tensor_names(transforms: dict[str, tuple[list[str], int]]) -> set[str]:
    """Checkpoint names of the matrices of :func:`read_transform_config`'s schemes."""
    return {weight_name(scheme, targets[0]) for scheme, (targets, _) in transforms.items()}


@torch.no_grad()
def install_transforms(model: nn.Module, transforms: dict[str, tuple[list[str], int]],
                       tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put an :class:`OnlineHadamard` on every target of every scheme (a plain linear becomes a spec-less QuantLinear
    carrier), after checking that the stored matrix is the one normquant builds for the layer's size."""
    checked: set[tuple[HadamardPlan, str]] = set()  # (plan, stored matrix) pairs already compared
    for scheme, (targets, head_dim) in transforms.items():
        key = weight_name(scheme, targets[0])
        stored = tensors.get(key)
        if stored is None:
            raise ExportError(f"{where}: tensor {key} (the matrix of transform {scheme}) is missing; re-export")
        for target in targets:
            try:
                module = model.get_submodule(target)
            except AttributeError:
                module = None
            if module is None or not is_linear(module):
                raise ExportError(f"{where}: transform {scheme} targets {show(target)}, which is no linear of "
                                  f"{type(model).__name__}; re-export")
            carrier = module if isinstance(module, QuantLinear) else QuantLinear.wrap(module, None, None)
            plan = hadamard_plan(carrier.in_features)
            if (plan, key) not in checked:
                want = hadamard_signs(plan)
                same = tuple(stored.shape) == tuple(want.shape) and torch.equal(stored.double(), want)
                if plan.block != head_dim or not same:
                    raise ExportError(f"{where}: {key} is not the Hadamard matrix normquant builds for {target} "
                                      f"({carrier.in_features} channels, blocks of {plan.block}; head_dim {head_dim}, "
                                      f"stored {list(stored.shape)}); re-export")
                checked.add((plan, key))
            carrier.input_transform = OnlineHadamard(carrier.in_features)
            if carrier is not module:
                model.set_submodule(target, carrier)


def apply_transforms(model: nn.Module, path: str | Path) -> nn.Module:
    """The transformers route for an export with online transforms: on ``model`` =
    ``AutoModelForCausalLM.from_pretrained(path)`` (which ignores ``transform_config``), compressed-tensors' own
    ``apply_transform_config``, then the checkpoint's matrices into the weights it created (shared by each scheme's
    targets: one tensor per scheme). Returns ``model``; needs ``compressed-tensors``."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors import safe_open

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())["quantization_config"].get("transform_config") or {}
    if not raw.get("config_groups"):
        return model
    config = TransformConfig.model_validate(raw)
    apply_transform_config(model, config)
    suffixes = tuple(f".{scheme}_{args.location}.weight"
                     for scheme, s in config.config_groups.items() for args in s.apply)
    wanted = {n for n, _ in model.named_parameters(remove_duplicate=False) if n.endswith(suffixes)}
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
    unloaded = [s for s in suffixes if not any(k.endswith(s) for k in state)]
    if unloaded:  # compressed-tensors would run its own random matrix: not the exported model
        raise ExportError(f"{path} holds no transform weight *{unloaded[0]}; re-export")
    model.load_state_dict(state, strict=False)
    return model
