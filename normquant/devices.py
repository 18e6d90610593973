"""Device strings, checked before anything is loaded: one line that says what is wrong, not a torch traceback.

>>> check_device("cpu")
'cpu'
>>> check_device("gpu")
Traceback (most recent call last):
...
normquant.devices.DeviceError: unknown device 'gpu'; use cpu, cuda, cuda:N, mps or auto
"""
from __future__ import annotations

import re

import torch

from normquant.models.loading import ModelLoadError

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


class DeviceError(ModelLoadError):
    """A device the user asked for that this machine or this torch build cannot provide."""


def check_device(device: str | None) -> str:
    """Return ``device`` (``cpu`` for None) if this machine can use it; else raise :class:`DeviceError`.

    ``cpu``; ``cuda`` / ``cuda:N`` (CUDA available and N below the device count); ``mps``; ``auto``
    (accelerate's ``device_map="auto"``, which falls back to the CPU by itself).
    """
    if device is None:
        return "cpu"
    name = str(device).strip().lower()
    if name in ("cpu", "auto"):
        return name
    if m := _CUDA.match(name):
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
            raise DeviceError(f"device '{device}' requested but CUDA is not available: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= count:
            raise DeviceError(f"device '{device}' does not exist: {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' requested but MPS is not available on this machine; use --device cpu")
        return name
    raise DeviceError(f"unknown device '{device}'; use cpu, cuda, cuda:N, mps or auto")
