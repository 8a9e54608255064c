"""Flattening adapters into vectors: :class:`WeightLayout`.

A layout is an ordered list of *slots*, one per factor matrix: for every
module, its ``down`` factor (A, ``(r, in[, kh, kw])``) and then its ``up``
factor (B, ``(out, r[, 1, 1])``), each with its offset in the flat vector. This
is the paper's flattening ("A then B per module, in a fixed module order").

The layout also keeps the alpha (and rsLoRA flag) of every module so that a
flat vector can be turned back into an :class:`~w2wkit.adapter.Adapter`.
Adapters whose alpha differs from the layout's are rescaled on flattening (the
ratio of scales is folded into ``up``), so the flat vector always encodes the
same delta under the layout's scale.

The :attr:`WeightLayout.signature` hashes the module names, factor kinds and
shapes (not the alphas): two adapters can share one factor space exactly when
their signatures agree.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.errors import LayoutError

__all__ = ["Slot", "WeightLayout", "describe_layout_groups"]

FACTORS = ("down", "up")


@dataclass(frozen=True)
class Slot:
    """One factor matrix in the flat vector.

    Attributes
    ----------
    module : str
        Canonical module path.
    factor : str
        ``"down"`` (A) or ``"up"`` (B).
    shape : tuple of int
        Shape of the factor.
    offset : int
        Position of its first number in the flat vector.
    """

    module: str
    factor: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        """Number of entries."""
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        """One past the last position."""
        return self.offset + self.size


class WeightLayout:
    """Ordered factor slots mapping an adapter to a flat vector and back.

    Parameters
    ----------
    modules : sequence of tuple
        ``(module, down_shape, up_shape, alpha, rslora)`` per module, in
        flattening order.

    Attributes
    ----------
    slots : list of Slot
        Two per module (``down`` then ``up``).
    dim : int
        Length ``d`` of the flat vector.
    """

    def __init__(
        self,
        modules: Sequence[tuple[str, Sequence[int], Sequence[int], float, bool]],
    ) -> None:
        if not modules:
            raise LayoutError("a layout needs at least one module")
        self.slots: list[Slot] = []
        self.alphas: dict[str, float] = {}
        self.rslora: dict[str, bool] = {}
        offset = 0
        for module, down_shape, up_shape, alpha, rslora in modules:
            if module in self.alphas:
                raise LayoutError("module listed twice in layout", key=module)
            for factor, shape in (("down", down_shape), ("up", up_shape)):
                slot = Slot(module, factor, tuple(int(s) for s in shape), offset)
                self.slots.append(slot)
                offset = slot.stop
            self.alphas[module] = float(alpha)
            self.rslora[module] = bool(rslora)
        self.dim = offset
        self._by_module = {
            m: (self.slots[2 * i], self.slots[2 * i + 1]) for i, m in enumerate(self.alphas)
        }

    # ------------------------------------------------------------------ build
    @classmethod
    def from_adapter(cls, adapter: Adapter) -> WeightLayout:
        """The layout of ``adapter`` (its module order, shapes and alphas).

        Raises
        ------
        LayoutError
            When the adapter holds a layer without factors (LyCORIS delta).
        """
        rows = []
        for module, layer in adapter.items():
            if not isinstance(layer, LoraLayer):
                raise LayoutError(
                    "layer has no LoRA factors (LyCORIS delta); the factors "
                    "representation needs LoRA factors",
                    path=adapter.source,
                    key=module,
                    hint='use `representation="delta"`',
                )
            rows.append((module, layer.down.shape, layer.up.shape, layer.alpha, layer.rslora))
        return cls(rows)

    # ------------------------------------------------------------- properties
    @property
    def modules(self) -> list[str]:
        """Module paths in order."""
        return list(self.alphas)

    def __len__(self) -> int:
        return len(self.alphas)

    def slots_of(self, module: str) -> tuple[Slot, Slot]:
        """``(down_slot, up_slot)`` of ``module``."""
        return self._by_module[module]

    def rank(self, module: str) -> int:
        """Rank of ``module`` in this layout."""
        return int(self._by_module[module][0].shape[0])

    def scale(self, module: str) -> float:
        """LoRA scale ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA) of ``module``."""
        r = self.rank(module)
        return self.alphas[module] / (math.sqrt(r) if self.rslora[module] else r)

    def shape_key(self) -> list[list[Any]]:
        """``[module, factor, shape]`` per slot: what the signature hashes."""
        return [[s.module, s.factor, list(s.shape)] for s in self.slots]

    @property
    def signature(self) -> str:
        """Stable 16-hex-digit hash of module names, factor kinds and shapes.

        Independent of the module order (files of different formats list
        modules in different orders; flattening goes by module name).
        """
        text = json.dumps(sorted(self.shape_key()), separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightLayout):
            return NotImplemented
        return self.shape_key() == other.shape_key() and self.alphas == other.alphas

    def __hash__(self) -> int:
        return hash(self.signature)

    def __repr__(self) -> str:
        return f"WeightLayout({len(self)} modules, d={self.dim}, signature={self.signature})"

    # ------------------------------------------------------------ flattening
    def check(self, adapter: Adapter, name: str | None = None) -> None:
        """Raise :class:`LayoutError` naming the first difference from ``adapter``."""
        where = name or adapter.source
        diff = self.difference(adapter)
        if diff:
            raise LayoutError(
                f"does not match the layout ({diff})",
                path=where,
                hint='use `representation="delta"` for collections of different ranks or modules',
            )

    def difference(self, adapter: Adapter) -> str | None:
        """Describe how ``adapter`` differs from this layout, or ``None``."""
        mods = list(adapter.layers)
        missing = [m for m in self.alphas if m not in adapter.layers]
        extra = [m for m in mods if m not in self.alphas]
        if missing:
            return f"missing module {missing[0]}" + (
                f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            )
        if extra:
            return f"extra module {extra[0]}" + (
                f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            )
        for module in self.alphas:
            layer = adapter.layers[module]
            if not isinstance(layer, LoraLayer):
                return f"module {module} is a {getattr(layer, 'kind', 'delta')} layer"
            down, up = self._by_module[module]
            if tuple(layer.down.shape) != down.shape or tuple(layer.up.shape) != up.shape:
                return (
                    f"module {module} has down {tuple(layer.down.shape)} / up "
                    f"{tuple(layer.up.shape)}, layout has {down.shape} / {up.shape}"
                )
        return None

    def flatten(self, adapter: Adapter, out: np.ndarray | None = None) -> np.ndarray:
        """Flatten ``adapter`` into the layout's vector.

        Parameters
        ----------
        adapter : Adapter
            Must have this layout's modules and factor shapes (any module
            order, any alphas: a differing scale is folded into ``up``).
        out : numpy.ndarray, optional
            Preallocated ``(d,)`` float32 destination.

        Returns
        -------
        numpy.ndarray
            ``(d,)`` float32.
        """
        self.check(adapter)
        vec = np.empty(self.dim, dtype=np.float32) if out is None else out
        for module, (down, up) in self._by_module.items():
            layer = adapter.layers[module]
            assert isinstance(layer, LoraLayer)
            vec[down.offset : down.stop] = np.asarray(layer.down, dtype=np.float32).ravel()
            ratio = layer.scale / self.scale(module)
            upv = np.asarray(layer.up, dtype=np.float32).ravel()
            vec[up.offset : up.stop] = upv if ratio == 1.0 else upv * np.float32(ratio)
        return vec

    def unflatten(
        self, vec: np.ndarray, *, metadata: dict[str, str] | None = None, dtype: str = "F32"
    ) -> Adapter:
        """Turn a ``(d,)`` vector back into an :class:`Adapter` (layout alphas).

        Raises
        ------
        LayoutError
            When ``vec`` has the wrong length.
        """
        vec = np.asarray(vec)
        if vec.shape != (self.dim,):
            raise LayoutError(f"vector has shape {vec.shape}, layout needs ({self.dim},)")
        layers: dict[str, LoraLayer] = {}
        for module, (down, up) in self._by_module.items():
            layers[module] = LoraLayer(
                down=np.array(vec[down.offset : down.stop], dtype=np.float32).reshape(down.shape),
                up=np.array(vec[up.offset : up.stop], dtype=np.float32).reshape(up.shape),
                alpha=self.alphas[module],
                rslora=self.rslora[module],
                dtype=dtype,
            )
        return Adapter(layers, dict(metadata or {}))

    # ----------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (see :meth:`from_dict`)."""
        return {
            "signature": self.signature,
            "dim": self.dim,
            "modules": [
                {
                    "module": m,
                    "down": list(self._by_module[m][0].shape),
                    "up": list(self._by_module[m][1].shape),
                    "alpha": self.alphas[m],
                    "rslora": self.rslora[m],
                }
                for m in self.alphas
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightLayout:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        LayoutError
            When the description is malformed or its signature does not match.
        """
        try:
            layout = cls(
                [
                    (m["module"], m["down"], m["up"], float(m["alpha"]), bool(m.get("rslora")))
                    for m in data["modules"]
                ]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(f"malformed layout description ({exc})") from None
        sig = data.get("signature")
        if sig is not None and sig != layout.signature:
            raise LayoutError(
                f"layout signature mismatch (stored {sig}, computed {layout.signature})"
            )
        return layout


def describe_layout_groups(groups: dict[str, list[str]], layouts: dict[str, WeightLayout]) -> str:
    """One line naming each layout group, its files and how it differs.

    Parameters
    ----------
    groups : dict of str to list of str
        Signature -> names of the models with that layout, largest first.
    layouts : dict of str to WeightLayout
        Signature -> layout.

    Returns
    -------
    str
    """
    sigs = sorted(groups, key=lambda s: -len(groups[s]))
    ref = layouts[sigs[0]]
    parts = []
    for i, sig in enumerate(sigs):
        names = groups[sig]
        shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
        lay = layouts[sig]
        ranks = sorted({lay.rank(m) for m in lay.modules})
        rank_text = "/".join(map(str, ranks))
        desc = f"group {i + 1}: {len(names)} model(s) [{shown}] {len(lay)} modules"
        desc += f", rank {rank_text}"
        if i > 0:
            desc += f" ({_layout_diff(ref, lay)})"
        parts.append(desc)
    return "; ".join(parts)


def _layout_diff(ref: WeightLayout, other: WeightLayout) -> str:
    missing = [m for m in ref.modules if m not in other.alphas]
    extra = [m for m in other.modules if m not in ref.alphas]
    if missing:
        return f"lacks {missing[0]}" + (f" +{len(missing) - 1}" if len(missing) > 1 else "")
    if extra:
        return f"adds {extra[0]}" + (f" +{len(extra) - 1}" if len(extra) > 1 else "")
    for m in ref.modules:
        a, b = ref.slots_of(m), other.slots_of(m)
        if a[0].shape != b[0].shape or a[1].shape != b[1].shape:
            return f"{m}: down {b[0].shape} vs {a[0].shape}"
    return "differs"
