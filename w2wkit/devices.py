"""The one device and dtype resolver of w2wkit (torch is imported when called).

At the lowest layer so that every torch user can take it: the solvers (a fit on a GPU), the
diffusion engine (:mod:`w2wkit.diffusion`, which re-exports it) and everything above.
"""

from __future__ import annotations

from typing import Any

from w2wkit.errors import W2WError

__all__ = ["DTYPES", "resolve_device", "torch_device", "torch_dtype"]

#: Accepted spellings of the compute dtype.
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_device(device: str | None = "auto", *, error: type[W2WError] = W2WError) -> str:
    """``"auto"``/``None`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``.

    Parameters
    ----------
    device : str or None
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    error : type
        The :class:`W2WError` subclass raised (the solvers raise ``SpaceError``).

    Raises
    ------
    W2WError
        A CUDA device asked for on a machine where torch sees none.
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise error(
            f"'{dev}' asked for but torch sees no CUDA GPU",
            param="device",
            hint='use `device="cpu"`',
        )
    return dev


def torch_device(device: str) -> Any:
    """``torch.device`` of ``device``, a bare ``"cuda"`` made explicit (``cuda:0``)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def torch_dtype(dtype: str | Any) -> Any:
    """``torch.float32`` / ``float16`` / ``bfloat16`` from a name in :data:`DTYPES` (or a dtype).

    Raises
    ------
    W2WError
        An unknown name.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPES.get(str(dtype).lower())
    if name is None:
        raise W2WError(
            f"unknown dtype '{dtype}'", param="dtype", hint="use float32, float16 or bfloat16"
        )
    return getattr(torch, name)
