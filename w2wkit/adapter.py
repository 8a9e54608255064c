"""The canonical in-memory LoRA adapter.

Every file format is read into, and written from, one :class:`Adapter`: an
ordered mapping from a *module path* to a layer. Module paths are diffusers
module names with a component prefix, for example
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``.

Arrays are numpy arrays (torch is never needed here). Tensors stored as
bfloat16 are held as float32 (an exact widening) and the storage dtype is
remembered so a writer can store them back bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from w2wkit.errors import FormatError

__all__ = ["COMPONENTS", "Adapter", "DeltaLayer", "LoraLayer", "degenerate_factors"]

#: Component prefixes a module path may start with.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")


def degenerate_factors(down_shape: tuple[int, ...], up_shape: tuple[int, ...]) -> str | None:
    """Why LoRA factors of these shapes make no usable layer, or ``None``.

    A layer of rank 0, or with any zero-size dimension, changes nothing and
    makes the scale ``alpha / r`` undefined; it is refused on read.

    Parameters
    ----------
    down_shape : tuple of int
        Shape of the A factor, ``(r, in[, kh, kw])``.
    up_shape : tuple of int
        Shape of the B factor, ``(out, r[, 1, 1])``.

    Returns
    -------
    str or None
        The reason, for a message ("rank 0 ...", "zero-size ...").
    """
    down_shape, up_shape = tuple(down_shape), tuple(up_shape)
    if (down_shape and down_shape[0] == 0) or (len(up_shape) > 1 and up_shape[1] == 0):
        return (
            f"degenerate layer of rank 0 (down {down_shape}, up {up_shape}): it changes "
            "nothing and its scale alpha/r is undefined"
        )
    if 0 in down_shape or 0 in up_shape:
        return f"degenerate layer with a zero-size dimension (down {down_shape}, up {up_shape})"
    return None


@dataclass
class LoraLayer:
    """One low-rank layer: ``delta = scale * up @ down``.

    Parameters
    ----------
    down : numpy.ndarray
        The A factor, shape ``(r, in)`` for linear layers or
        ``(r, in, kh, kw)`` for convolutions.
    up : numpy.ndarray
        The B factor, shape ``(out, r)`` or ``(out, r, 1, 1)``.
    alpha : float
        The LoRA alpha. The scale is ``alpha / r`` (``alpha / sqrt(r)`` when
        ``rslora`` is true).
    rslora : bool
        Rank-stabilised scaling.
    dtype : str
        Storage dtype in safetensors spelling (``"F32"``, ``"F16"``,
        ``"BF16"``) used by writers unless told otherwise.
    """

    down: np.ndarray
    up: np.ndarray
    alpha: float
    rslora: bool = False
    dtype: str = "F32"

    @property
    def rank(self) -> int:
        """Rank ``r`` of the layer."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """Multiplier applied to ``up @ down``."""
        r = self.rank
        return float(self.alpha) / (math.sqrt(r) if self.rslora else r)

    @property
    def out_features(self) -> int:
        """Rows of the delta."""
        return int(self.up.shape[0])

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Trailing shape of the delta: ``(in,)`` or ``(in, kh, kw)``."""
        return tuple(int(s) for s in self.down.shape[1:])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of :meth:`delta`: ``(out, in)`` or ``(out, in, kh, kw)``."""
        return (self.out_features, *self.in_shape)

    def delta(self) -> np.ndarray:
        """Materialise the weight delta.

        Returns
        -------
        numpy.ndarray
            float32 array of shape ``(out, in)`` or ``(out, in, kh, kw)``
            equal to ``scale * up @ down``.
        """
        up = self.up.reshape(self.up.shape[0], self.rank).astype(np.float32)
        down = self.down.reshape(self.rank, -1).astype(np.float32)
        return (np.float32(self.scale) * (up @ down)).reshape(self.delta_shape)

    def validate(self, module: str, path: str | None = None, *, check_finite: bool = True) -> None:
        """Check shapes agree and (unless ``check_finite`` is false) values are finite.

        Raises
        ------
        FormatError
            Naming ``path`` and ``module`` when the factors do not fit together
            or contain NaN/Inf.
        """
        if self.down.ndim not in (2, 4) or self.up.ndim not in (2, 4):
            raise FormatError(
                f"factor ranks unsupported (down {tuple(self.down.shape)}, "
                f"up {tuple(self.up.shape)})",
                path=path,
                key=module,
            )
        why = degenerate_factors(self.down.shape, self.up.shape)
        if why is not None:
            raise FormatError(why, path=path, key=module)
        r_up = self.up.shape[1]
        if r_up != self.down.shape[0]:
            raise FormatError(
                f"up/down shape mismatch: up {tuple(self.up.shape)} has rank {r_up}, "
                f"down {tuple(self.down.shape)} has rank {self.down.shape[0]}",
                path=path,
                key=module,
            )
        if self.up.ndim == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise FormatError(
                f"conv up factor must be (out, r, 1, 1), got {tuple(self.up.shape)}",
                path=path,
                key=module,
            )
        if not math.isfinite(float(self.alpha)):
            raise FormatError(f"alpha is {self.alpha}", path=path, key=module)
        for name, arr in (("down", self.down), ("up", self.up)):
            if check_finite and not np.isfinite(arr).all():
                bad = "NaN" if np.isnan(arr).any() else "Inf"
                raise FormatError(f"{name} factor contains {bad} values", path=path, key=module)


@dataclass
class DeltaLayer:
    """A layer known only as its exact weight delta (LyCORIS LoHa/LoKr).

    Parameters
    ----------
    weight : numpy.ndarray
        The delta, shape ``(out, in)`` or ``(out, in, kh, kw)``, scale
        already applied.
    kind : str
        Where it came from (``"loha"``, ``"lokr"``).
    """

    weight: np.ndarray
    kind: str = "delta"
    dtype: str = "F32"

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the delta."""
        return tuple(int(s) for s in self.weight.shape)

    def delta(self) -> np.ndarray:
        """Return the delta as float32, shape ``delta_shape``."""
        return np.asarray(self.weight, dtype=np.float32)

    def validate(self, module: str, path: str | None = None, *, check_finite: bool = True) -> None:
        """Raise :class:`FormatError` for a delta that cannot be a layer.

        That is: not 2-D/4-D, a zero-size dimension, or (unless
        ``check_finite`` is false) NaN/Inf values.
        """
        if self.weight.ndim not in (2, 4):
            raise FormatError(
                f"delta must be 2-D or 4-D, got shape {self.delta_shape}", path=path, key=module
            )
        if 0 in self.weight.shape:
            raise FormatError(
                f"degenerate layer: delta has a zero-size dimension {self.delta_shape}",
                path=path,
                key=module,
            )
        if check_finite and not np.isfinite(self.weight).all():
            raise FormatError("delta contains NaN or Inf values", path=path, key=module)


Layer = LoraLayer | DeltaLayer


@dataclass
class Adapter:
    """An ordered mapping ``module path -> layer`` plus file metadata.

    Parameters
    ----------
    layers : dict of str to LoraLayer or DeltaLayer
        Insertion order is the adapter's module order.
    metadata : dict of str to str
        Free-form metadata kept from (and written to) the file header, for
        example kohya's ``ss_*`` keys.
    source : str, optional
        Path the adapter was read from.
    format : str, optional
        Name of the format it was read from.
    """

    layers: dict[str, Layer] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    format: str | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __contains__(self, module: object) -> bool:
        return module in self.layers

    def __getitem__(self, module: str) -> Layer:
        return self.layers[module]

    def items(self) -> Iterator[tuple[str, Layer]]:
        """Iterate ``(module, layer)`` pairs in order."""
        return iter(self.layers.items())

    @property
    def is_lora(self) -> bool:
        """True when every layer is a factorised :class:`LoraLayer`."""
        return all(isinstance(layer, LoraLayer) for layer in self.layers.values())

    @property
    def components(self) -> list[str]:
        """Component prefixes present, in order of first appearance."""
        seen: dict[str, None] = {}
        for module in self.layers:
            seen.setdefault(module.split(".", 1)[0], None)
        return list(seen)

    def deltas(self) -> dict[str, np.ndarray]:
        """Materialise every layer's delta.

        Returns
        -------
        dict of str to numpy.ndarray
            ``module -> delta`` with shapes ``(out, in[, kh, kw])``.
        """
        return {module: layer.delta() for module, layer in self.layers.items()}

    def validate(self, *, check_finite: bool = True) -> Adapter:
        """Validate every layer; return ``self``.

        Parameters
        ----------
        check_finite : bool
            Also reject NaN/Inf values (readers check the raw tensors instead,
            so the message names the file's own key).

        Raises
        ------
        FormatError
            For an empty adapter or any invalid layer, naming the source file.
        """
        if not self.layers:
            raise FormatError("no LoRA layers found", path=self.source)
        for module, layer in self.layers.items():
            layer.validate(module, self.source, check_finite=check_finite)
        return self

    def _stored(self) -> Iterator[np.ndarray]:
        """The stored arrays: factors of LoRA layers, deltas of LyCORIS ones."""
        for layer in self.layers.values():
            if isinstance(layer, LoraLayer):
                yield layer.down
                yield layer.up
            else:
                yield layer.weight

    def numel(self) -> int:
        """Number of stored values (factor entries, or delta entries for LyCORIS)."""
        return int(sum(a.size for a in self._stored()))

    def nbytes(self) -> int:
        """Bytes held by the factor arrays."""
        return int(sum(a.nbytes for a in self._stored()))

    def with_metadata(self, extra: Mapping[str, Any]) -> Adapter:
        """Return a shallow copy with ``extra`` merged into the metadata."""
        meta = dict(self.metadata)
        meta.update({str(k): str(v) for k, v in extra.items()})
        return Adapter(dict(self.layers), meta, self.source, self.format)
