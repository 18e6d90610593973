"""Checkpoint integrity: the manifest an export carries, and the checks a reload makes before it trusts a tensor.

``normquant_manifest.json`` is written *last* into the export (inside its temporary directory, so an export
without one was never completed). It holds, per tensor of ``model.safetensors``, its dtype, shape and a sha256
of its bytes; a sha256 of the quantization sections of ``config.json`` (``quantization_config`` and
``normquant``: a hand edit of ``bits`` or ``config_groups`` is caught); and the sha256 of every other file but
``config.json`` and ``generation_config.json`` (the tokenizer's).

A reload (:func:`normquant.export.checkpoint.load_quantized`) checks, before building any layer:

1. ``model.safetensors``: its header parses and the file holds every byte the header promises (truncation);
2. ``config.json``: the quantization sections have the types the schema needs, compressed-tensors' quantization
   args agree with normquant's exact specs, and each group's format is the one those specs export to;
3. per quantized layer (:func:`check_layer_tensors`): the tensors the format needs, no others, with the dtypes
   and shapes the layer's ``[out, in]`` and specs imply (``bits`` vs the packed width, ``weight_shape`` vs the
   packed size, scales vs groups), codes and zero points on the grid, finite positive scales;
4. the manifest: same tensors, dtypes and shapes, the config checksum and every tensor's and file's checksum.

Any mismatch is an :class:`~normquant.export.schema.ExportError` naming the file or tensor: a corrupt or edited
export is an error, never a number.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from normquant.export.schema import DENSE, INT_QUANTIZED, PACK_QUANTIZED, ExportError, scale_shape, weight_format
from normquant.io import file_sha256
from normquant.messages import one_line, show
from normquant.quant.spec import QuantSpec

MANIFEST_NAME = "normquant_manifest.json"
MANIFEST_FORMAT = "normquant-manifest"
MANIFEST_VERSION = 1
#: files whose edits are allowed (config.json's quantization sections are covered by their own checksum)
UNCHECKED_FILES = {"config.json", "generation_config.json", MANIFEST_NAME}
_CHUNK = 1 << 24
#: header bytes a safetensors file may declare (the format's own limit is 100 MB)
_MAX_HEADER = 100_000_000

#: safetensors dtype names <-> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


# ---------------------------------------------------------------------------------------------- safetensors
def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """``({tensor: {"dtype", "shape", "data_offsets"}}, data_start)`` of a safetensors file, checked against the
    file's size: a truncated or garbled file is an :class:`ExportError` naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ExportError(f"{path} is truncated ({size} bytes): not a safetensors file; re-export")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ExportError(f"{path} is truncated or not a safetensors file (header of {n:,} bytes in a file of "
                                  f"{size:,}); re-export")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise ExportError(f"{path}: the safetensors header is not valid JSON (corrupt file); re-export") from None
    if not isinstance(header, dict):
        raise ExportError(f"{path}: the safetensors header is not a mapping (corrupt file); re-export")
    header.pop("__metadata__", None)
    data_start, end = 8 + n, 0
    for name, info in header.items():
        try:
            dtype, shape, (begin, stop) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            itemsize = torch.empty(0, dtype=ST_DTYPES[dtype]).element_size()
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"{path}: tensor {show(name)} has a malformed header entry; re-export") from None
        if stop - begin != math.prod(shape) * itemsize or begin < 0 or stop < begin:
            raise ExportError(f"{path}: tensor {name} ({dtype} {shape}) spans {stop - begin} bytes, which does not "
                              "match its shape (corrupt file); re-export")
        end = max(end, stop)
    if data_start + end > size:
        raise ExportError(f"{path} is truncated: {size:,} bytes, its header needs {data_start + end:,}; re-export")
    return header, data_start


def tensor_checksums(path: Path, header: dict[str, dict], data_start: int) -> dict[str, str]:
    """sha256 of every tensor's bytes, read from the file (streamed: large tensors are not held twice)."""
    sums = {}
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, stop = info["data_offsets"]
            f.seek(data_start + begin)
            h, left = hashlib.sha256(), stop - begin
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise ExportError(f"{path} is truncated inside tensor {name}; re-export")
                h.update(chunk)
                left -= len(chunk)
            sums[name] = h.hexdigest()
    return sums



def config_checksum(config: dict) -> str:
    """sha256 of the quantization sections of config.json (``quantization_config``, ``normquant``), canonical JSON."""
    key = {k: config.get(k) for k in ("quantization_config", "normquant")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- manifest
def write_manifest(directory: Path, weights_name: str) -> Path:
    """Write the manifest of the export being assembled in ``directory`` (call it after every other file)."""
    config = json.loads((directory / "config.json").read_text())
    header, start = read_safetensors_header(directory / weights_name)
    sums = tensor_checksums(directory / weights_name, header, start)
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "weights": weights_name,
        "config_sha256": config_checksum(config),
        "tensors": {name: {"dtype": info["dtype"], "shape": info["shape"], "sha256": sums[name]}
                    for name, info in sorted(header.items())},
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                  for p in sorted(directory.iterdir())
                  if p.is_file() and p.name not in UNCHECKED_FILES and p.name != weights_name},
    }
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{directory} has no {MANIFEST_NAME}: the export is incomplete or was altered (the manifest "
                          "is written last); re-export")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is unreadable ({one_line(e, 120)}); re-export") from None
    ok = (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
          and isinstance(manifest.get("tensors"), dict) and isinstance(manifest.get("files"), dict)
          and isinstance(manifest.get("config_sha256"), str)
          and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in manifest["tensors"].values())
          and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in manifest["files"].values()))
    if not ok:
        raise ExportError(f"{path} is not a normquant manifest (edited?); re-export")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > MANIFEST_VERSION:
        raise ExportError(f"{path} has manifest version {show(manifest.get('version'))}; this normquant reads "
                          f"{MANIFEST_VERSION}: upgrade normquant")
    return manifest


def verify_manifest(directory: Path, manifest: dict, config: dict, weights: Path, header: dict[str, dict],
                    data_start: int) -> None:
    """The export's files against its manifest: config checksum, tensor set / dtypes / shapes, every checksum."""
    if config_checksum(config) != manifest["config_sha256"]:
        raise ExportError(f"{directory / 'config.json'}: quantization_config or the normquant section was changed "
                          "after export (checksum mismatch); restore it or re-export")
    expected, found = set(manifest["tensors"]), set(header)
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise ExportError(f"{weights} does not hold the tensors its manifest lists: missing {one_line(missing[:3], 200)}"
                          f", unexpected {one_line(extra[:3], 200)}; re-export")
    for name in sorted(found):
        want, info = manifest["tensors"][name], header[name]
        if want.get("dtype") != info["dtype"] or list(want.get("shape", [])) != list(info["shape"]):
            raise ExportError(f"{weights}: tensor {name} is {info['dtype']} {info['shape']}, the manifest says "
                              f"{show(want.get('dtype'))} {show(want.get('shape'))}; re-export")
    sums = tensor_checksums(weights, header, data_start)
    for name in sorted(found):
        if sums[name] != manifest["tensors"][name]["sha256"]:
            raise ExportError(f"{weights}: tensor {name} does not match its checksum (corrupted or modified after "
                              "export); re-export")
    for fname, want in sorted(manifest["files"].items()):
        path = directory / fname
        if not path.is_file():
            raise ExportError(f"{path} is missing (listed in the manifest); re-export")
        if file_sha256(path) != want["sha256"]:
            raise ExportError(f"{path} does not match its checksum (modified after export); re-export")


# ---------------------------------------------------------------------------------------------- config
def _args_agree(args: Any, spec: QuantSpec | None, role: str) -> str | None:
    """Why compressed-tensors' args disagree with normquant's spec, or None."""
    if spec is None:
        return None if args is None else "quantization args where normquant's spec has none"
    if not isinstance(args, dict):
        return f"{show(args)} where the spec is {spec.short()}"
    strategy = "channel" if role == "weights" and spec.granularity == "token" else spec.granularity
    want = {"num_bits": spec.bits, "symmetric": spec.symmetric, "strategy": strategy,
            "group_size": spec.group_size, "type": "int"}
    if role == "input_activations":
        want["dynamic"] = spec.dynamic
    for key, value in want.items():
        if args.get(key) != value or type(args.get(key)) is not type(value):
            return f"{key} is {show(args.get(key))} but normquant's spec ({spec.short()}) needs {show(value)}"
    return None


def check_config(config: dict, where: str) -> tuple[dict, dict]:
    """``(quantization_config, {group: (weight_spec, input_spec, format)})`` of a normquant export's config, after
    checking the types the loader relies on and that compressed-tensors' args match normquant's exact specs."""
    from pydantic import ValidationError

    qconfig, section = config.get("quantization_config"), config.get("normquant")
    if not isinstance(qconfig, dict) or not isinstance(section, dict):
        raise ExportError(f"{where}: quantization_config and normquant must be mappings; the config was edited: "
                          "re-export")
    if qconfig.get("quant_method") != "compressed-tensors":
        raise ExportError(f"{where}: quantization_config.quant_method is {show(qconfig.get('quant_method'))}, not "
                          "'compressed-tensors'; this normquant export's config was edited: restore it or re-export")
    groups, specs, ignore = qconfig.get("config_groups"), section.get("quant_specs"), qconfig.get("ignore", [])
    kv_only = groups == {} and section.get("kv_cache") is not None  # float weights, quantized KV cache
    if not isinstance(groups, dict) or not (groups or kv_only) or not all(isinstance(g, dict) for g in groups.values()):
        raise ExportError(f"{where}: quantization_config.config_groups must map group names to groups (got "
                          f"{show(groups)}); re-export")
    if not isinstance(specs, dict):
        raise ExportError(f"{where}: normquant.quant_specs must be a mapping (got {show(specs)}); re-export")
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise ExportError(f"{where}: quantization_config.ignore must be a list of names (got {show(ignore)})")
    default_format = qconfig.get("format")
    out = {}
    for gname, group in groups.items():
        at = f"{where}: quantization_config.config_groups.{gname}"
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ExportError(f"{at}.targets must be a non-empty list of module names (got {show(targets)})")
        gspecs = specs.get(gname)
        if not isinstance(gspecs, dict):
            raise ExportError(f"{where}: normquant.quant_specs has no entry for {show(gname)}; the config was edited: "
                              "re-export")
        try:
            wspec, aspec = (None if gspecs.get(role) is None else QuantSpec.model_validate(gspecs[role])
                            for role in ("weights", "input_activations"))
        except (ValidationError, TypeError) as e:
            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            raise ExportError(f"{where}: normquant.quant_specs.{gname} is not a valid spec ({one_line(msg, 120)}); "
                              "re-export") from None
        if wspec is None and aspec is None:
            raise ExportError(f"{at}: quantizes nothing; re-export")
        for role, spec in (("weights", wspec), ("input_activations", aspec)):
            why = _args_agree(group.get(role), spec, role)
            if why:
                raise ExportError(f"{at}.{role}: {why}; the config was edited: restore it or re-export")
        fmt = group.get("format") or default_format
        expected = weight_format(wspec, aspec)
        if fmt != expected:
            raise ExportError(f"{at}: format {show(fmt)}, but its specs export as {expected!r}; restore it or re-export")
        out[gname] = (wspec, aspec, fmt)
    return qconfig, out


# ---------------------------------------------------------------------------------------------- layers
def _packed_cols(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def expected_layer_tensors(fmt: str, wspec: QuantSpec | None, aspec: QuantSpec | None, out_f: int, in_f: int,
                           has_bias: bool) -> dict[str, tuple[torch.dtype | None, tuple]]:
    """``{local name: (dtype, shape)}`` of one quantized linear in ``fmt`` (dtype None: any float dtype)."""
    want: dict[str, tuple[torch.dtype | None, tuple]] = {}
    if fmt == DENSE:
        want["weight"] = (None, (out_f, in_f))
    else:
        sshape = scale_shape(wspec, out_f, in_f)
        want["weight_scale"] = (torch.float32, sshape)
        if fmt == PACK_QUANTIZED:
            want["weight_packed"] = (torch.int32, (out_f, _packed_cols(in_f, wspec.bits)))
            want["weight_shape"] = (torch.int64, (2,))
        else:
            want["weight"] = (torch.int8, (out_f, in_f))
        if not wspec.symmetric:
            packed_zero = fmt == PACK_QUANTIZED and wspec.granularity != "tensor"
            want["weight_zero_point"] = ((torch.int32, (_packed_cols(sshape[0], wspec.bits), sshape[1]))
                                         if packed_zero else (torch.int8, sshape))
    if has_bias:  # optional: a step may have given the layer a bias the architecture has not (RepQuant)
        want["bias"] = (None, (out_f,))
    if aspec is not None and not aspec.dynamic:
        want["input_scale"] = (torch.float32, (1,))
        if not aspec.symmetric:
            want["input_zero_point"] = (torch.int8, (1,))
    return want


def check_layer_tensors(name: str, tensors: dict[str, torch.Tensor], fmt: str, wspec: QuantSpec | None,
                        aspec: QuantSpec | None, out_f: int, in_f: int) -> None:
    """Refuse (naming the tensor) checkpoint tensors of layer ``name`` that do not fit its specs and ``[out, in]``."""
    want = expected_layer_tensors(fmt, wspec, aspec, out_f, in_f, "bias" in tensors)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing:
        raise ExportError(f"{name}.{missing[0]} is missing: layer {name} ({fmt}, "
                          f"{wspec.short() if wspec else 'float'} weights) needs {', '.join(sorted(want))}; re-export")
    if extra:
        raise ExportError(f"{name}.{extra[0]} is not expected for layer {name} ({fmt}, "
                          f"{wspec.short() if wspec else 'float'} weights); the config or tensors were edited: re-export")
    for key, (dtype, shape) in want.items():
        t = tensors[key]
        if (dtype is not None and t.dtype != dtype) or (dtype is None and not t.is_floating_point()):
            raise ExportError(f"{name}.{key} is {t.dtype}, expected {dtype or 'a float dtype'}; re-export")
        if tuple(t.shape) != tuple(shape):
            detail = ""
            if key == "weight_packed":
                detail = f" ({in_f} {wspec.bits}-bit codes per row of layer [{out_f}, {in_f}] pack into {shape[1]} int32)"
            elif key == "weight_scale":
                detail = f" (one scale per {wspec.granularity} of [{out_f}, {in_f}] for {wspec.short()})"
            raise ExportError(f"{name}.{key} has shape {list(t.shape)}, expected {list(shape)}{detail}; the config or "
                              "tensors were edited: re-export")
    if fmt == DENSE:
        return
    if fmt == PACK_QUANTIZED and tensors["weight_shape"].tolist() != [out_f, in_f]:
        raise ExportError(f"{name}.weight_shape is {tensors['weight_shape'].tolist()}, but the layer is "
                          f"[{out_f}, {in_f}]; re-export")
    scale = tensors["weight_scale"]
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ExportError(f"{name}.weight_scale holds non-finite or non-positive values; the export is corrupt: re-export")
    lo, hi = -(2 ** (wspec.bits - 1)), 2 ** (wspec.bits - 1) - 1  # compressed-tensors' signed grid
    if fmt == INT_QUANTIZED:
        codes = tensors["weight"]
        if int(codes.min()) < lo or int(codes.max()) > hi:
            raise ExportError(f"{name}.weight holds codes in [{int(codes.min())}, {int(codes.max())}], outside the "
                              f"{wspec.bits}-bit grid [{lo}, {hi}]; the config or tensors were edited: re-export")
    zero = tensors.get("weight_zero_point")
    if zero is not None and zero.dtype == torch.int8 and (int(zero.min()) < lo or int(zero.max()) > hi):
        raise ExportError(f"{name}.weight_zero_point is outside the {wspec.bits}-bit grid [{lo}, {hi}]; re-export")
    if "input_scale" in tensors:
        s = tensors["input_scale"]
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ExportError(f"{name}.input_scale is non-finite or non-positive; the export is corrupt: re-export")


__all__ = ["MANIFEST_NAME", "check_config", "check_layer_tensors", "read_manifest", "read_safetensors_header",
           "verify_manifest", "write_manifest"]
