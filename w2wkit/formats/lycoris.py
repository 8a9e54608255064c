"""LyCORIS LoHa and LoKr files, read as exact deltas (read-only).

Module names are kohya's (``lora_unet_...``, ``lora_te_...``). Per module:

LoHa (Hadamard product of two low-rank matrices), rank ``r = hada_w1_b.shape[0]``::

    delta = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r

with Tucker cores for convolutions (``hada_t1``, ``hada_t2`` of shape
``(r, r, kh, kw)``; ``hada_w?_a`` then ``(r, out)`` and ``hada_w?_b``
``(r, in)``)::

    W_i[p, q, k, l] = sum_{a, b} t_i[a, b, k, l] * w_i_a[a, p] * w_i_b[b, q]
    delta = W_1 * W_2 * alpha / r

LoKr (Kronecker product)::

    delta = kron(W1, W2) * scale
    W1 = lokr_w1 or lokr_w1_a @ lokr_w1_b
    W2 = lokr_w2 or lokr_w2_a @ lokr_w2_b
         or (Tucker) sum_{a,b} lokr_t2[a, b, k, l] * lokr_w2_a[a, p] * lokr_w2_b[b, q]

``scale = alpha / r`` where ``r`` is the rank of the first factorised part
(``lokr_w1_b.shape[0]``, else ``lokr_w2_b.shape[0]``); when both ``W1`` and
``W2`` are stored whole there is no rank and ``scale = 1`` whatever alpha
says (LyCORIS' own convention). A missing ``alpha`` means ``alpha = r``.
For convolutions ``W1`` is broadcast as ``(a, c, 1, 1)``.

Files may also hold plain LoRA/LoCon layers (``lora_down``/``lora_up``);
they are read as :class:`~w2wkit.adapter.LoraLayer`. Convolution deltas
stored flattened (``(out, in*kh*kw)``) are reshaped with the module tables
when the module is known.

Expansion bound
---------------
A Kronecker or Hadamard product turns a few numbers into many, so a tiny
file can ask for gigabytes. Before any delta is computed, the size of every
delta is worked out from the factor shapes, and the file is refused (naming
it and its largest module) when the deltas together would take more than
``max(EXPAND_FLOOR, EXPAND_RATIO * file size)`` bytes as float32, that is
more than 1 GiB and more than 8192 bytes of delta per byte of file. Real
LyCORIS files stay well inside it: over every Linear/Conv module of the SD1.5
or SDXL UNet, fp16 LoKr files with LyCORIS' default split (``factor=-1``)
come to 4,200-7,100 bytes per byte at rank 1-4 of the second factor, 1,800
with both factors whole, and 64 with ``factor=8``; LoHa at rank 1 to about
1,200 (Tucker convolutions 5,700). What it refuses is a file like a rank-1
decomposition of *both* Kronecker factors over every module (35,000), or a
170 kB file claiming a 2.5 GB delta. While a module is computed it also
takes a few times its float32 size in float64 temporaries.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from w2wkit.adapter import Adapter, DeltaLayer, LoraLayer
from w2wkit.errors import FormatError
from w2wkit.formats.base import Source, WriteOptions
from w2wkit.formats.kohya import (
    REFUSED_SUFFIXES,
    SUFFIXES,
    group_kohya_keys,
    kohya_module,
    lora_layer,
    read_alpha,
)
from w2wkit.names import guess_family, load_module_tables

__all__ = [
    "EXPAND_FLOOR",
    "EXPAND_RATIO",
    "LOHA_SUFFIXES",
    "LOKR_SUFFIXES",
    "LycorisFormat",
    "expanded_size",
    "loha_delta",
    "lokr_delta",
]

#: Deltas of a file may always take this many bytes (float32) ...
EXPAND_FLOOR = 1 << 30
#: ... or this many times the file's size, whichever is larger.
EXPAND_RATIO = 8192

#: LoHa suffix -> role.
LOHA_SUFFIXES: dict[str, str] = {
    "hada_w1_a": "w1a",
    "hada_w1_b": "w1b",
    "hada_w2_a": "w2a",
    "hada_w2_b": "w2b",
    "hada_t1": "t1",
    "hada_t2": "t2",
}

#: LoKr suffix -> role.
LOKR_SUFFIXES: dict[str, str] = {
    "lokr_w1": "k1",
    "lokr_w1_a": "k1a",
    "lokr_w1_b": "k1b",
    "lokr_w2": "k2",
    "lokr_w2_a": "k2a",
    "lokr_w2_b": "k2b",
    "lokr_t2": "kt2",
}

_LORA_SUFFIXES = tuple("." + s for s in SUFFIXES)
_ALL = {**SUFFIXES, **LOHA_SUFFIXES, **LOKR_SUFFIXES}
_REFUSED = {
    **REFUSED_SUFFIXES,
    "lora_mid.weight": "LoCon Tucker layers (lora_mid) are not supported",
}


def _tucker(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    # W[p, q, ...] = sum_{a,b} t[a, b, ...] wa[a, p] wb[b, q]
    return np.einsum("ab...,ap,bq->pq...", t, wa, wb)


def loha_delta(
    w1a: np.ndarray,
    w1b: np.ndarray,
    w2a: np.ndarray,
    w2b: np.ndarray,
    alpha: float | None,
    t1: np.ndarray | None = None,
    t2: np.ndarray | None = None,
) -> np.ndarray:
    """LoHa delta (see the module docstring), computed in float64.

    Returns
    -------
    numpy.ndarray
        ``(out, in)`` (or ``(out, in*kh*kw)`` for flattened convolutions,
        ``(out, in, kh, kw)`` with Tucker cores), float64.
    """
    f = np.float64
    r = int(w1b.shape[0])
    scale = (r if alpha is None else alpha) / r
    if t1 is not None and t2 is not None:
        m1 = _tucker(t1.astype(f), w1a.astype(f), w1b.astype(f))
        m2 = _tucker(t2.astype(f), w2a.astype(f), w2b.astype(f))
    else:
        m1 = w1a.reshape(w1a.shape[0], -1).astype(f) @ w1b.reshape(r, -1).astype(f)
        m2 = w2a.reshape(w2a.shape[0], -1).astype(f) @ w2b.reshape(w2b.shape[0], -1).astype(f)
        tail = tuple(w1b.shape[2:])
        if tail:
            m1 = m1.reshape(m1.shape[0], -1, *tail)
            m2 = m2.reshape(m2.shape[0], -1, *tail)
    return m1 * m2 * scale


def lokr_delta(
    alpha: float | None,
    w1: np.ndarray | None = None,
    w1a: np.ndarray | None = None,
    w1b: np.ndarray | None = None,
    w2: np.ndarray | None = None,
    w2a: np.ndarray | None = None,
    w2b: np.ndarray | None = None,
    t2: np.ndarray | None = None,
) -> np.ndarray:
    """LoKr delta (see the module docstring), computed in float64.

    Returns
    -------
    numpy.ndarray
        ``(a*b, c*d)`` or ``(a*b, c*d, kh, kw)``, float64.
    """
    f = np.float64
    rank = None
    if w1 is None:
        if w1a is None or w1b is None:
            raise ValueError("LoKr needs lokr_w1 or lokr_w1_a and lokr_w1_b")
        rank = int(w1b.shape[0])
        w1 = w1a.astype(f) @ w1b.astype(f)
    if w2 is None:
        if w2a is None or w2b is None:
            raise ValueError("LoKr needs lokr_w2 or lokr_w2_a and lokr_w2_b")
        if rank is None:
            rank = int(w2b.shape[0])
        if t2 is not None:
            w2 = _tucker(t2.astype(f), w2a.astype(f), w2b.astype(f))
        else:
            w2 = (w2a.astype(f) @ w2b.reshape(w2b.shape[0], -1).astype(f)).reshape(
                w2a.shape[0], *w2b.shape[1:]
            )
    if rank is None:
        scale = 1.0
    else:
        scale = (rank if alpha is None else alpha) / rank
    w1 = np.asarray(w1, dtype=f)
    w2 = np.asarray(w2, dtype=f)
    if w2.ndim > w1.ndim:
        w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - w1.ndim)))
    return np.kron(w1, w2) * scale


#: Dimensions LyCORIS writes for each factor.
_NDIMS = {
    **dict.fromkeys(("w1a", "w2a", "k1", "k1a", "k1b", "k2a"), (2,)),
    **dict.fromkeys(("w1b", "w2b", "k2b", "k2"), (2, 4)),
    **dict.fromkeys(("t1", "t2", "kt2"), (4,)),
}
_ROLE_KEY = {role: suffix for suffix, role in {**LOHA_SUFFIXES, **LOKR_SUFFIXES}.items()}


def _size(shape: tuple[int, ...]) -> int:
    return math.prod(int(d) for d in shape)


def expanded_size(kind: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """Number of entries of a LoHa/LoKr delta, from its factor shapes alone.

    Parameters
    ----------
    kind : {"loha", "lokr"}
    shapes : dict of str to tuple of int
        Role (``"w1a"``, ``"t1"``, ``"k1"``, ``"k2b"``, ...) -> factor shape.

    Returns
    -------
    int
        Entries of the delta (factors that do not fit together in other ways
        are refused when the delta is computed).

    Raises
    ------
    ValueError
        For a factor whose number of dimensions LyCORIS never writes.
    """
    for role, shape in shapes.items():
        if len(shape) not in _NDIMS[role]:
            raise ValueError(f"{_ROLE_KEY[role]} has shape {shape}")
    if kind == "loha":
        sides = []
        for i in ("1", "2"):
            wa, wb, t = shapes[f"w{i}a"], shapes[f"w{i}b"], shapes.get(f"t{i}")
            if t is not None:  # (a, b, kh, kw) x (a, out) x (b, in) -> (out, in, kh, kw)
                side = (wa[-1] if wa else 1, wb[-1] if wb else 1, *t[2:])
            else:  # (out, r) @ (r, in[, kh, kw])
                side = (wa[0] if wa else 1, _size(wb[1:]))
            sides.append(side)
        a, b = sides
        n = max(len(a), len(b))
        a = (1,) * (n - len(a)) + tuple(a)
        b = (1,) * (n - len(b)) + tuple(b)
        return _size(tuple(max(x, y) for x, y in zip(a, b, strict=True)))
    if "k1" in shapes:
        n1 = _size(shapes["k1"])
    else:
        n1 = (shapes["k1a"][0] if shapes["k1a"] else 1) * _size(shapes["k1b"][1:])
    if "k2" in shapes:
        n2 = _size(shapes["k2"])
    elif "kt2" in shapes:
        w2a, w2b = shapes["k2a"], shapes["k2b"]
        n2 = (w2a[-1] if w2a else 1) * (w2b[-1] if w2b else 1) * _size(shapes["kt2"][2:])
    else:
        n2 = (shapes["k2a"][0] if shapes["k2a"] else 1) * _size(shapes["k2b"][1:])
    return n1 * n2


def _check_expansion(src: Source, planned: list[tuple[str, int]]) -> None:
    """Refuse before allocating when the deltas are out of proportion to the file."""
    total = sum(n for _, n in planned) * 4
    limit = max(EXPAND_FLOOR, EXPAND_RATIO * src.nbytes)
    if total <= limit:
        return
    kname, largest = max(planned, key=lambda p: p[1])
    raise FormatError(
        f"LyCORIS layers would expand to {total / 2**30:.1f} GiB of float32 deltas from a "
        f"{src.nbytes / 1e3:,.0f} kB file, out of proportion to it (limit: the larger of "
        f"{EXPAND_FLOOR / 2**30:g} GiB and {EXPAND_RATIO} x the file size); this module alone "
        f"expands to {largest:,} values",
        path=src.path,
        key=kname,
    )


def _known_shape(module: str, family: str) -> tuple[int, ...] | None:
    tables = load_module_tables()
    order = [family] if family in tables else []
    order += [f for f in tables if f not in order]
    for fam in order:
        shape = tables[fam].get(module)
        if shape is not None:
            return shape
    return None


class LycorisFormat:
    """LyCORIS LoHa / LoKr files (read-only; layers become exact deltas)."""

    name = "lycoris"
    writable = False
    description = "LyCORIS LoHa (hada_*) / LoKr (lokr_*), read as exact deltas"

    def sniff(self, src: Source) -> float:
        """0.95 when LoHa/LoKr keys with kohya module names are present."""
        keys = src.tensors.keys()
        if sum(map(str.endswith, keys, itertools.repeat(_LORA_SUFFIXES))) == len(keys):
            return 0.0  # plain kohya LoRA: nothing for this format
        for key in src.tensors:
            kname, _, suffix = key.partition(".")
            if (suffix in LOHA_SUFFIXES or suffix in LOKR_SUFFIXES) and kname.startswith("lora_"):
                return 0.95
        return 0.0

    def read(self, src: Source) -> Adapter:
        """Materialise every LoHa/LoKr layer's delta.

        Raises
        ------
        FormatError
            For unknown keys, DoRA, incomplete LoHa/LoKr factor sets or
            shapes that do not fit, naming the file and key.
        """
        groups = group_kohya_keys(src, _ALL, _REFUSED)
        modules = {kname: kohya_module(kname, src.path) for kname in groups}
        family = guess_family(modules.values())
        planned = []
        for kname, roles in groups.items():
            shapes = {r: tuple(src.tensors[k].shape) for r, k in roles.items() if r != "alpha"}
            if "down" in roles or "up" in roles:
                continue
            try:
                if any(r in shapes for r in ("w1a", "w1b", "w2a", "w2b", "t1", "t2")):
                    if all(n in shapes for n in ("w1a", "w1b", "w2a", "w2b")):
                        planned.append((kname, expanded_size("loha", shapes)))
                elif ("k1" in shapes or {"k1a", "k1b"} <= shapes.keys()) and (
                    "k2" in shapes or {"k2a", "k2b"} <= shapes.keys()
                ):
                    planned.append((kname, expanded_size("lokr", shapes)))
            except ValueError as exc:
                raise FormatError(
                    f"LyCORIS factors do not fit together: {exc}",
                    path=src.path,
                    key=next(iter(roles.values())),
                ) from None
        _check_expansion(src, planned)
        layers: dict[str, LoraLayer | DeltaLayer] = {}
        for kname, roles in groups.items():
            module = modules[kname]
            arrays = {role: src.tensors[key] for role, key in roles.items() if role != "alpha"}
            first_key = next(iter(roles.values()))
            if "down" in roles or "up" in roles:
                if set(roles) - {"down", "up", "alpha"}:
                    raise FormatError(
                        "mixes lora_down/lora_up with LoHa/LoKr keys", path=src.path, key=first_key
                    )
                layers[module] = lora_layer(src, kname, roles)
                continue
            alpha = read_alpha(src, roles.get("alpha"))
            try:
                if any(r in roles for r in ("w1a", "w1b", "w2a", "w2b", "t1", "t2")):
                    kind = "loha"
                    need = ("w1a", "w1b", "w2a", "w2b")
                    missing = [n for n in need if n not in arrays]
                    if missing or (("t1" in arrays) != ("t2" in arrays)):
                        raise FormatError(
                            "incomplete LoHa layer (needs hada_w1_a, hada_w1_b, hada_w2_a, "
                            "hada_w2_b, and hada_t1 with hada_t2)",
                            path=src.path,
                            key=first_key,
                        )
                    delta = loha_delta(
                        arrays["w1a"],
                        arrays["w1b"],
                        arrays["w2a"],
                        arrays["w2b"],
                        alpha,
                        arrays.get("t1"),
                        arrays.get("t2"),
                    )
                else:
                    kind = "lokr"
                    if "k1" not in arrays and not ("k1a" in arrays and "k1b" in arrays):
                        raise ValueError("needs lokr_w1 or lokr_w1_a with lokr_w1_b")
                    if "k2" not in arrays and not ("k2a" in arrays and "k2b" in arrays):
                        raise ValueError("needs lokr_w2 or lokr_w2_a with lokr_w2_b")
                    delta = lokr_delta(
                        alpha,
                        arrays.get("k1"),
                        arrays.get("k1a"),
                        arrays.get("k1b"),
                        arrays.get("k2"),
                        arrays.get("k2a"),
                        arrays.get("k2b"),
                        arrays.get("kt2"),
                    )
            except ValueError as exc:  # matmul/einsum/kron shape errors
                raise FormatError(
                    f"LyCORIS factors do not fit together: {exc}", path=src.path, key=first_key
                ) from None
            known = _known_shape(module, family)
            if (
                known is not None
                and len(known) == 4
                and delta.ndim == 2
                and delta.size == int(np.prod(known))
            ):
                delta = delta.reshape(known)
            layers[module] = DeltaLayer(delta.astype(np.float32), kind=kind)
        return Adapter(layers, dict(src.metadata))

    def write(self, adapter: Adapter, path: Path, options: WriteOptions) -> None:
        """LyCORIS files are read-only here."""
        raise FormatError("writing LyCORIS files is not supported", path=path)
