"""The device a command or training script runs on, checked before anything is built.

:func:`resolve_device` turns a ``--device`` value into a ``torch.device`` that this machine has, or
raises :class:`DeviceError` (a ``ValueError``) with one line naming ``--device``, what was expected
and what was received. The CLI, the applications and every training script use it.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DeviceError", "resolve_device"]

_EXPECTED = "expected cpu, cuda, cuda:N or another accelerator"


class DeviceError(ValueError):
    """A ``--device`` value that names no device, or one that this machine does not have (one line)."""


def resolve_device(name: Optional[str], flag: str = "--device") -> torch.device:
    """The device ``name`` asks for, checked; the first accelerator (else the CPU) when None.

    Args:
        name: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ... or None for the default.
        flag: the option that the message names.

    Raises:
        DeviceError: for a name torch does not know, a device that computes nothing (``meta``), or an
            accelerator (or index) this machine does not have.
    """
    if name is None:
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        return accelerator if accelerator is not None else torch.device("cpu")
    try:
        device = torch.device(str(name).strip())
    except (RuntimeError, ValueError):
        raise DeviceError(f"{flag}: {_EXPECTED}, received {name!r}") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise DeviceError(f"{flag}: {name!r} computes nothing; {_EXPECTED}")
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or accelerator.type != device.type:
        have = f"only {accelerator.type} and cpu" if accelerator is not None else "only the cpu"
        raise DeviceError(f"{flag}: {name!r} is not available on this machine ({have})")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"{flag}: {name!r} does not exist, this machine has {count} {device.type} device(s)")
    return device
