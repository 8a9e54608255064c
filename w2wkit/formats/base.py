"""What every LoRA format module builds on: the parsed file, how it is loaded, the protocol.

Format modules import from here, never from :mod:`w2wkit.formats.registry`
(which imports them through its explicit list), so the imports point one way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from w2wkit.adapter import Adapter
from w2wkit.errors import FormatError
from w2wkit.jsonio import read_json
from w2wkit.stio import SafetensorsFile, check_regular_file, read_safetensors

__all__ = [
    "LAYOUT_COMPONENTS",
    "LORA_SUFFIXES",
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "PICKLE_SUFFIXES",
    "LoraFormat",
    "Source",
    "WriteOptions",
    "component_subfolders",
    "load_source",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
LORA_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Source:
    """A LoRA file (or PEFT folder) parsed into raw tensors.

    Attributes
    ----------
    path : str
        The file or folder the user named.
    tensors : dict of str to numpy.ndarray
        Raw tensors by key (bfloat16 widened to float32).
    dtypes : dict of str to str
        Storage dtype per key.
    metadata : dict of str to str
        safetensors ``__metadata__``.
    config : dict, optional
        A PEFT ``adapter_config.json`` when the source is a PEFT folder.
    weights_path : str
        The weights file actually read.
    nbytes : int
        Size of the weights file.
    """

    path: str
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    config: dict[str, Any] | None = None
    weights_path: str = ""
    nbytes: int = 0
    file: SafetensorsFile | None = None

    def all_finite(self) -> bool:
        """True when every float tensor of the file is known to be finite (one pass)."""
        return self.file is not None and self.file.all_finite()

    @property
    def keys(self) -> list[str]:
        """Tensor keys in file order."""
        return list(self.tensors)


@dataclass
class WriteOptions:
    """Options shared by every writer.

    Attributes
    ----------
    dtype : str, optional
        Storage dtype for every tensor (``"F32"``, ``"F16"``, ``"BF16"``);
        default keeps each layer's own.
    overwrite : bool
        Replace an existing output.
    provenance : dict of str to str
        Extra metadata recording what made the file; merged into the header.
    """

    dtype: str | None = None
    overwrite: bool = False
    provenance: dict[str, str] = field(default_factory=dict)


class LoraFormat(Protocol):
    """What a registered format provides."""

    name: ClassVar[str]
    writable: ClassVar[bool]
    description: ClassVar[str]

    def sniff(self, src: Source) -> float:
        """Confidence in [0, 1] that ``src`` is in this format.

        Must depend only on the key names and on ``src.config is None``
        (results are cached per key set).
        """

    def read(self, src: Source) -> Adapter:
        """Translate ``src`` into the canonical adapter (not yet validated)."""

    def write(self, adapter: Adapter, path: Path, options: WriteOptions) -> None:
        """Write ``adapter`` to ``path`` atomically (writable formats only)."""


def _torch_pickle(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    import torch  # lazy: only for explicit pickle opt-in

    from w2wkit.pickles import load_tensors

    obj = load_tensors(path, what="LoRA pickle")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FormatError("pickle does not hold a dict of tensors", path=path)
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    names = {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float64: "F64",
    }
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        dtypes[key] = names.get(value.dtype, "F32")
        tensors[key] = (
            value.detach().float().numpy()
            if value.dtype == torch.bfloat16
            else (value.detach().numpy())
        )
    return tensors, dtypes


def _is_file(path: Path) -> bool:
    """True for a regular file, False when nothing is there; refuses FIFOs, devices, folders."""
    if not os.path.lexists(path):
        return False
    check_regular_file(path)
    return True


def _peft_folder(path: Path) -> tuple[Path, dict[str, Any]] | None:
    cfg = path / PEFT_CONFIG
    if not _is_file(cfg):
        return None
    config = read_json(cfg, what=PEFT_CONFIG, error=FormatError)
    for name in PEFT_WEIGHTS:
        if _is_file(path / name):
            return path / name, config
    raise FormatError(
        f"PEFT folder has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}", path=path
    )


#: Component subfolders of the diffusers/PEFT training layout, in reading order.
LAYOUT_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def component_subfolders(path: Path) -> list[Path]:
    """PEFT adapters in ``path/unet``, ``path/text_encoder``... when ``path`` has none itself.

    The layout PEFT's DreamBooth example (and other training scripts) save: one
    ``save_pretrained`` folder per pipeline component, nothing at the top.
    """
    if _is_file(path / PEFT_CONFIG):
        return []
    return [path / c for c in LAYOUT_COMPONENTS if _is_file(path / c / PEFT_CONFIG)]


def _component_folders(path: Path) -> tuple[Path, dict[str, Any]] | None:
    subs = component_subfolders(path)
    return _peft_folder(subs[0]) if subs else None


def load_source(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Source:
    """Parse a LoRA file or PEFT folder into raw tensors.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.safetensors`` file, a pickle file (with ``allow_pickle``), or a
        PEFT folder holding ``adapter_config.json``.
    allow_pickle : bool
        Permit ``.pt/.pth/.ckpt/.bin`` files, loaded with
        ``torch.load(weights_only=True)``.

    Raises
    ------
    FormatError
        For a missing, unreadable or non-LoRA file.
    """
    p = Path(path)
    config = None
    if not p.exists():
        raise FormatError("no such file or folder", path=p)
    if p.is_dir():
        found = _peft_folder(p)
        if found is None:
            found = _component_folders(p)
        if found is None:
            raise FormatError(
                f"folder is not a PEFT adapter (no {PEFT_CONFIG}); "
                "pass a file, or use a collection for a folder of LoRA files",
                path=p,
            )
        weights, config = found
    else:
        check_regular_file(p)  # a FIFO or a device is refused before it is opened
        weights = p
        sibling = p.parent / PEFT_CONFIG
        if p.name in PEFT_WEIGHTS and _is_file(sibling):
            config = _peft_folder(p.parent)[1]  # type: ignore[index]
    if weights.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FormatError(
                "pickle files can run code when loaded; refusing",
                path=weights,
                hint="convert it to .safetensors, or pass `allow_pickle=True` if you trust it",
            )
        nbytes = check_regular_file(weights)
        tensors, dtypes = _torch_pickle(str(weights))
        meta: dict[str, str] = {}
    else:
        st: SafetensorsFile = read_safetensors(weights)
        tensors, dtypes, meta, nbytes = st.tensors, st.dtypes, st.metadata, st.nbytes
        if not tensors:
            raise FormatError("file holds no tensors", path=weights)
        return Source(str(p), tensors, dtypes, meta, config, str(weights), nbytes, st)
    if not tensors:
        raise FormatError("file holds no tensors", path=weights)
    return Source(str(p), tensors, dtypes, meta, config, str(weights), nbytes)
