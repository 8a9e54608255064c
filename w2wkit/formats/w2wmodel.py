"""Models saved by the weights2weights code (``w2wmodel.pt``): read as LoRA adapters.

Their sampling, editing and inversion scripts save the state of their
``LoRAw2w`` network: the model's coefficients ``proj`` (``(1, k)``), and the
release's ``mean``/``std`` (``(d,)``) and principal directions ``v``
(``(d, k)``, or wider). The flattened LoRA is ``w = (proj @ v[:, :k].T) * std +
mean``, cut into modules by the release's ``weight_dimensions.pt`` (``lora_A``
then ``lora_B`` per module, in its order). That file is looked for next to the
model, in its parent folders (and their ``files/`` subfolders, the release's
layout), and in the folder named by the ``W2WKIT_W2W_FILES`` environment
variable. Alpha and rank come from an ``adapter_config.json`` beside it, else
rank from the shapes and alpha 27 (the weights2weights code's).

The file is a pickle: read only with ``allow_pickle`` (``torch.load`` with
``weights_only=True``, see :mod:`w2wkit.pickles`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.errors import FormatError
from w2wkit.formats.base import Source

__all__ = [
    "DEFAULT_ALPHA",
    "FILES_ENV",
    "W2WModelFormat",
    "find_weight_dimensions",
    "parse_release_key",
]

#: alpha of the weights2weights LoRAs when no adapter_config.json says otherwise.
DEFAULT_ALPHA = 27.0
#: Environment variable naming the release's ``files/`` folder.
FILES_ENV = "W2WKIT_W2W_FILES"
_KEYS = ("proj", "mean", "std", "v")

_PEFT = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+?)\.lora_(?P<f>[AB])(?:\.(?!weight$)[^.]+)?\.weight$"
)
_KOHYA = re.compile(
    r"^(?P<path>lora_(?:unet|te|te1|te2)_.+?)[._]lora[._](?P<f>A|B|down|up)(?:\.[^.]+)?\.weight$"
)


def parse_release_key(key: str) -> tuple[str, str]:
    """Canonical ``(module path, factor)`` of a release key.

    Raises
    ------
    FormatError
        For a key that is neither a PEFT nor a kohya-style LoRA key.
    """
    m = _KOHYA.match(key)
    if m:
        from w2wkit.names import kohya_to_module

        factor = "down" if m["f"] in ("A", "down") else "up"
        return kohya_to_module(m["path"]), factor
    m = _PEFT.match(key)
    if m:
        path = m["path"]
        if not path.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
            path = "unet." + path  # the release's PEFT model is the UNet
        return path, "down" if m["f"] == "A" else "up"
    raise FormatError("not a LoRA key of the weights2weights release", key=key)


def _role(key: str) -> str | None:
    last = key.rsplit(".", 1)[-1]
    return last if last in _KEYS else None


def find_weight_dimensions(model_path: str | os.PathLike[str]) -> Path | None:
    """The release's ``weight_dimensions.pt`` for a saved model, if one can be found."""
    start = Path(model_path).resolve()
    start = start if start.is_dir() else start.parent
    places = []
    env = os.environ.get(FILES_ENV)
    if env:
        places.append(Path(env))
    for folder in (start, *list(start.parents)[:4]):
        places += [folder, folder / "files"]
    for place in places:
        cand = place / "weight_dimensions.pt"
        if cand.is_file():
            return cand
    return None


class W2WModelFormat:
    """``w2wmodel.pt``: a weights2weights model (coefficients + the release's basis)."""

    name = "w2w-model"
    writable = False
    description = "weights2weights saved model (w2wmodel.pt: proj, mean, std, v; read only)"

    def sniff(self, src: Source) -> float:
        """1 for exactly ``proj``, ``mean``, ``std``, ``v`` (any prefix); 0.9 with other keys."""
        roles = [_role(k) for k in src.tensors]
        if sorted(r for r in roles if r is not None) != sorted(_KEYS):
            return 0.0
        return 1.0 if len(roles) == 4 else 0.9

    def read(self, src: Source) -> Adapter:
        """The LoRA the saved coefficients make, cut by the release's ``weight_dimensions.pt``.

        Raises
        ------
        FormatError
            When ``weight_dimensions.pt`` cannot be found or does not fit.
        """
        from w2wkit.jsonio import read_json
        from w2wkit.pickles import load_tensors

        t = {
            _role(k): np.asarray(v, dtype=np.float64)
            for k, v in src.tensors.items()
            if _role(k) is not None
        }
        proj, mean, std, v = (t[k] for k in _KEYS)
        proj = proj.reshape(1, -1) if proj.ndim == 1 else proj
        d, k = mean.size, proj.shape[-1]
        if proj.shape[0] != 1 or std.size != d or v.ndim != 2 or v.shape[0] != d or v.shape[1] < k:
            raise FormatError(
                f"inconsistent shapes: proj {list(proj.shape)}, mean {list(mean.shape)}, "
                f"std {list(std.shape)}, v {list(v.shape)}",
                path=src.path,
            )
        flat = (proj @ v[:, :k].T).reshape(-1) * std.reshape(-1) + mean.reshape(-1)
        dims_path = find_weight_dimensions(src.path)
        if dims_path is None:
            raise FormatError(
                "a weights2weights model holds coefficients of the release's components; "
                "its module layout is in the release's weight_dimensions.pt, not found near it",
                path=src.path,
                hint=f"put it under the release folder, or set {FILES_ENV}=<release>/files",
            )
        dims = load_tensors(dims_path, what="weight_dimensions.pt")
        if not isinstance(dims, dict):
            raise FormatError("weight_dimensions.pt is not a dict", path=dims_path)
        cfg_path = dims_path.parent / "adapter_config.json"
        alpha = DEFAULT_ALPHA
        if cfg_path.is_file():
            alpha = float(read_json(cfg_path, error=FormatError).get("lora_alpha", alpha))
        parts: dict[str, dict[str, np.ndarray]] = {}
        offset = 0
        for key, value in dims.items():
            module, factor = parse_release_key(str(key))
            shape = tuple(int(s) for s in value[1])
            n = int(np.prod(shape))
            if offset + n > d:
                break
            parts.setdefault(module, {})[factor] = flat[offset : offset + n].reshape(shape)
            offset += n
        if offset != d:
            raise FormatError(
                f"the model has d={d} weights, weight_dimensions.pt describes "
                f"{offset if offset < d else 'more'}",
                path=src.path,
                hint=f"{dims_path} is not this model's release",
            )
        layers = {}
        for module, f in parts.items():
            if set(f) != {"down", "up"}:
                raise FormatError("module lacks a factor", path=dims_path, key=module)
            layers[module] = LoraLayer(
                down=f["down"].astype(np.float32), up=f["up"].astype(np.float32), alpha=alpha
            )
        meta = {"w2wkit.w2w_release": str(dims_path.parent), "w2wkit.w2w_components": str(k)}
        return Adapter(layers=layers, metadata=meta)
