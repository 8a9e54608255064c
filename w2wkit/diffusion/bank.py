"""The per-sample LoRA bank: each sample of a batch through its own model's factors.

All models of a bank share a layout (same modules, same ranks), so instead of
loading one adapter per model, the bank replaces each targeted ``Linear`` /
``Conv2d`` of a pipeline with a layer that adds, for batch element ``b``, its
own low-rank update::

    y_b = base(x_b) + s * (x_b @ A_{m(b)}^T) @ B_{m(b)}^T

where ``m(b)`` is the bank row (model) sample ``b`` uses, ``A`` is
``(M, r, in)`` (``(M, r, in, kh, kw)`` for a convolution), ``B`` is
``(M, out, r)`` and ``s`` a scale (1 when it is folded into ``B``, as the
renderer does). Rows are chosen per pipeline component (``unet``,
``text_encoder``) through :meth:`LoraBank.set_index`; ``None`` runs the bare
base model.

One implementation, two modes:

- **frozen** (rendering, inversion): the factors are buffers; inversion swaps in
  tensors that require grad with :meth:`LoraBank.set_factors`;
- **trainable** (training many models in one batch): the factors are
  ``torch.nn.Parameter`` s, one row per model. The UNet has no batch-coupling
  layer (GroupNorm and attention are per sample), so the gradient of a sum of
  per-model losses gives every row exactly the gradient it would get alone.

torch is imported when a function needs it; importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.diffusion.pipeline import SUPPORTED_COMPONENTS, resolve_module
from w2wkit.errors import LayoutError

__all__ = [
    "LoraBank",
    "StackedLayer",
    "check_against_pipeline",
    "install_bank",
    "lora_init",
    "per_sample_lora",
    "require_modules",
    "stack_adapters",
    "stack_factors",
]


@dataclass
class StackedLayer:
    """The factors of one module for ``M`` models, scale folded into ``up``.

    Attributes
    ----------
    down : numpy.ndarray
        float32, ``(M, r, in)`` or ``(M, r, in, kh, kw)``; zero rows pad
        models of smaller rank (an exact no-op).
    up : numpy.ndarray
        float32, ``(M, out, r)`` holding ``scale_m * B_m``.
    """

    down: np.ndarray
    up: np.ndarray


def _describe(adapter: Adapter | None, i: int) -> str:
    if adapter is None:
        return "base"
    return adapter.source or f"adapter #{i}"


def stack_adapters(adapters: Sequence[Adapter | None]) -> dict[str, StackedLayer]:
    """Stack the factors of models that target the same modules.

    Parameters
    ----------
    adapters : sequence of Adapter or None
        ``None`` is the base model (zero update). Every adapter must consist
        of :class:`~w2wkit.adapter.LoraLayer` and target the same modules with
        the same factor shapes up to the rank; smaller ranks are zero-padded.

    Returns
    -------
    dict of str to StackedLayer
        In the module order of the first adapter.

    Raises
    ------
    LayoutError
        Non-LoRA layers, different module sets (naming the modules), or
        factor shapes that differ beyond the rank.
    """
    real = [(i, a) for i, a in enumerate(adapters) if a is not None]
    if not real:
        return {}
    i0, first = real[0]
    modules = list(first.layers)
    ref = set(modules)
    for i, a in real:
        for module, layer in a.items():
            if not isinstance(layer, LoraLayer):
                raise LayoutError(
                    f"layer is a {getattr(layer, 'kind', 'delta')} delta, not a LoRA; the renderer "
                    "needs factorised layers",
                    path=a.source,
                    key=module,
                )
        mods = set(a.layers)
        if mods != ref:
            missing = [m for m in modules if m not in mods]
            extra = [m for m in a.layers if m not in ref]
            parts = []
            if missing:
                parts.append(
                    f"lacks {len(missing)} module(s) of {_describe(first, i0)} ({missing[0]}...)"
                )
            if extra:
                parts.append(f"has {len(extra)} module(s) it does not ({extra[0]}...)")
            raise LayoutError(
                "adapters target different modules: " + "; ".join(parts), path=_describe(a, i)
            )
    out: dict[str, StackedLayer] = {}
    n = len(adapters)
    for module in modules:
        layers = [None if a is None else a.layers[module] for a in adapters]
        f0 = first.layers[module]
        assert isinstance(f0, LoraLayer)
        in_shape, out_f = f0.in_shape, f0.out_features
        for i, layer in enumerate(layers):
            if layer is None:
                continue
            assert isinstance(layer, LoraLayer)
            if layer.in_shape != in_shape or layer.out_features != out_f:
                raise LayoutError(
                    f"delta shape {layer.delta_shape} differs from {f0.delta_shape} of "
                    f"{_describe(first, i0)}",
                    path=_describe(adapters[i], i),
                    key=module,
                )
        r = max(layer.rank for layer in layers if layer is not None)  # type: ignore[union-attr]
        down = np.zeros((n, r, *in_shape), np.float32)
        up = np.zeros((n, out_f, r), np.float32)
        for i, layer in enumerate(layers):
            if layer is None:
                continue
            assert isinstance(layer, LoraLayer)
            k = layer.rank
            down[i, :k] = layer.down
            up[i, :, :k] = layer.up.reshape(out_f, k).astype(np.float64) * layer.scale
        out[module] = StackedLayer(down=down, up=up)
    return out


def stack_factors(
    stacks: Mapping[str, tuple[np.ndarray, np.ndarray]], alpha: float, component: str = "unet"
) -> dict[str, StackedLayer]:
    """Bank layers from raw stacked factors, the LoRA scale ``alpha / r`` folded into ``up``.

    Parameters
    ----------
    stacks : mapping of str to (numpy.ndarray, numpy.ndarray)
        Module name inside ``component`` -> ``(A (M, r, in), B (M, out, r))``
        (the layout of a world's ``loras.safetensors``).
    alpha : float
        LoRA alpha of every model.
    component : str
        The pipeline component the names live in.

    Returns
    -------
    dict of str to StackedLayer
        Keyed by canonical module path (``"unet.<name>"``).
    """
    out = {}
    for name, (a, b) in stacks.items():
        a = np.asarray(a, np.float32)
        scale = float(alpha) / float(a.shape[1])
        up = np.asarray(b, np.float32)
        if scale != 1.0:
            up = (up.astype(np.float64) * scale).astype(np.float32)
        out[f"{component}.{name}"] = StackedLayer(down=a, up=up)
    return out


def require_modules(pipe: Any, modules: Sequence[str], whose: str, hint: str) -> None:
    """One :class:`LayoutError` naming (three of) the ``modules`` that ``pipe`` lacks.

    ``whose`` names the modules' owner in the message (``"the space's"``).
    """
    missing = [m for m in modules if resolve_module(pipe, m) is None]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise LayoutError(
            f"{len(missing)} of {whose} {len(modules)} modules are not in the pipeline: "
            + ", ".join(missing[:3])
            + more,
            hint=hint,
        )


def check_against_pipeline(pipe: Any, stacked: Mapping[str, StackedLayer]) -> None:
    """Refuse a bank that does not fit ``pipe`` (modules, shapes, components, layer types).

    Raises
    ------
    LayoutError
        Naming the module and the shapes.
    """
    import torch

    bad_comp = sorted({m.split(".", 1)[0] for m in stacked} - set(SUPPORTED_COMPONENTS))
    if bad_comp:
        raise LayoutError(
            f"adapters target component(s) {', '.join(bad_comp)}; the renderer patches "
            f"{', '.join(SUPPORTED_COMPONENTS)} only"
        )
    require_modules(
        pipe, list(stacked), "the adapters'", "the adapters were made for another base model"
    )
    for module, st in stacked.items():
        mod = _unwrapped(resolve_module(pipe, module))
        if isinstance(mod, torch.nn.Linear):
            want = (mod.out_features, mod.in_features)
            got = (st.up.shape[1], *st.down.shape[2:])
            if st.down.ndim != 3 or tuple(got) != want:
                raise LayoutError(
                    f"delta shape {tuple(got)} does not fit the Linear weight {want}", key=module
                )
        elif isinstance(mod, torch.nn.Conv2d):
            want = tuple(mod.weight.shape)
            got = (st.up.shape[1], *st.down.shape[2:])
            if st.down.ndim == 3 and want[2:] == (1, 1):
                want = want[:2]  # linear-style factors on a 1x1 conv
            if tuple(got) != want:
                raise LayoutError(
                    f"delta shape {tuple(got)} does not fit the Conv2d weight {want}", key=module
                )
            if mod.groups != 1:
                raise LayoutError("grouped convolutions are not supported", key=module)
        else:
            raise LayoutError(
                f"module is a {type(mod).__name__}; the renderer patches Linear and Conv2d layers",
                key=module,
            )


# --------------------------------------------------------------------------- the layer


class _Selector:
    """Which bank row each batch element uses (one per pipeline component)."""

    def __init__(self) -> None:
        self.index: Any = None  # torch.LongTensor (batch,) or None (base model)
        # when set: ``index`` is ``arange(M).repeat_interleave(groups)`` for the bank's M
        # rows (every model's samples together, in row order), so no gather is needed
        self.groups: int | None = None


_LAYER_CLASS: Any = None


def _layer_class() -> Any:
    """The torch module class of a bank layer (built once, when torch is first needed)."""
    global _LAYER_CLASS
    if _LAYER_CLASS is not None:
        return _LAYER_CLASS
    import torch
    import torch.nn.functional as F

    class _Update(torch.autograd.Function):
        """``y + scale * (x @ A_m^T) @ B_m^T`` per sample, as one autograd node.

        Forward: 2 products (``bmm``, then ``addcmul`` for rank 1 / ``baddbmm``), plus a gather
        of each sample's factors unless the samples come grouped by model, and casts to
        ``y``'s type when the factors are float32 under autocast (the update is made in the
        base layer's output type, as a PEFT adapter makes it there). Backward: 4 ``bmm``s.
        Written by hand because the same update through autograd took 17 (float32) to 23
        (bf16 autocast) operators and about 8 graph nodes per layer and step, which made
        half-precision training on a GPU wait for the CPU to launch them
        (benchmarks/README.md, "The per-sample LoRA in training"; now 7 / 11 with grouped
        samples, ``benchmarks/count_bank_ops.py``).
        """

        @staticmethod
        def forward(
            ctx: Any, x: Any, y: Any, down: Any, up: Any, idx: Any, groups: Any, scale: float
        ) -> Any:
            dt = y.dtype
            if groups is None:
                a, b = down.index_select(0, idx), up.index_select(0, idx)
                g = x.shape[0]
            else:
                a, b = down, up
                g = down.shape[0]
            a, b = a.to(dt), b.to(dt)
            x3 = x.to(dt).reshape(g, -1, x.shape[-1])  # (G, L, in)
            y3 = y.reshape(g, -1, y.shape[-1])  # (G, L, out)
            h = torch.bmm(x3, a.transpose(1, 2))  # (G, L, r)
            bt = b.transpose(1, 2)  # (G, r, out)
            # rank 1: the second product is an outer product, which ``addcmul`` makes several
            # times faster than ``bmm`` with inner dimension 1 (benchmarks/README.md)
            if a.shape[1] == 1:
                out = torch.addcmul(y3, h, bt, value=scale)
            else:
                out = torch.baddbmm(y3, h, bt, alpha=scale)
            ctx.save_for_backward(x3, h, a, b, idx)
            ctx.meta = (groups, scale, x.shape, x.dtype, down.shape, down.dtype, up.dtype)
            return out.reshape(y.shape)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            x3, h, a, b, idx = ctx.saved_tensors
            groups, scale, x_shape, x_dtype, m_shape, down_dtype, up_dtype = ctx.meta
            need_x, need_y, need_a, need_b = ctx.needs_input_grad[:4]
            g3 = grad.reshape(x3.shape[0], -1, grad.shape[-1]).to(x3.dtype)  # (G, L, out)
            gx = ga = gb = None
            if need_x or need_a:
                gh = torch.bmm(g3, b)  # (G, L, r)
                if scale != 1.0:
                    gh = gh * scale
                if need_x:
                    gx = torch.bmm(gh, a).reshape(x_shape).to(x_dtype)
                if need_a:
                    ga = torch.bmm(gh.transpose(1, 2), x3).to(down_dtype)  # (G, r, in)
            if need_b:
                gb = torch.bmm(g3.transpose(1, 2), h)  # (G, out, r)
                if scale != 1.0:
                    gb = gb * scale
                gb = gb.to(up_dtype)
            if groups is None:  # back through the gather: rows of the same model add up
                if ga is not None:
                    ga = ga.new_zeros(m_shape).index_add_(0, idx, ga)
                if gb is not None:
                    gb = gb.new_zeros((m_shape[0], *gb.shape[1:])).index_add_(0, idx, gb)
            return gx, (grad if need_y else None), ga, gb, None, None, None

    class BankLayer(torch.nn.Module):
        """``base(x) + scale * per-sample low-rank update``; see :mod:`w2wkit.diffusion.bank`."""

        def __init__(
            self,
            base: Any,
            down: Any,
            up: Any,
            selector: _Selector,
            scale: float = 1.0,
            trainable: bool = False,
        ) -> None:
            super().__init__()
            self.base_layer = base
            if trainable:
                self.lora_down = torch.nn.Parameter(down)  # (M, r, in[, kh, kw])
                self.lora_up = torch.nn.Parameter(up)  # (M, out, r)
            else:
                self.register_buffer("lora_down", down, persistent=False)
                self.register_buffer("lora_up", up, persistent=False)
            self.selector = selector
            self.scale = float(scale)
            self.conv = isinstance(base, torch.nn.Conv2d)

        def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
            idx = self.selector.index
            dev = x.device.type
            if idx is not None and not self.conv and torch.is_autocast_enabled(dev):
                # the cast autocast would make inside the base layer, made once for it and
                # the update (one cast forward and one back instead of two each)
                half = torch.get_autocast_dtype(dev)
                if x.is_floating_point() and x.dtype != half:
                    x = x.to(half)
            y = self.base_layer(x, *args, **kwargs)
            if idx is None:
                return y
            n = x.shape[0]
            if idx.shape[0] != n:
                raise RuntimeError(
                    f"per-sample LoRA: batch of {n} but {idx.shape[0]} model indices"
                )
            groups = self.selector.groups
            if groups is not None and groups * self.lora_down.shape[0] != n:
                raise RuntimeError(
                    f"per-sample LoRA: batch of {n} is not {self.lora_down.shape[0]} models x "
                    f"{groups} samples"
                )
            if not self.conv:
                return _Update.apply(x, y, self.lora_down, self.lora_up, idx, groups, self.scale)
            a = self.lora_down.index_select(0, idx)
            b = self.lora_up.index_select(0, idx)
            if a.dtype != y.dtype:  # float32 factors under autocast: the update in y's type
                a, b = a.to(y.dtype), b.to(y.dtype)
            r = a.shape[1]
            base = self.base_layer
            if a.ndim == 3:  # linear-style factors on a 1x1 conv
                a = a[..., None, None]
            c, hgt, wid = x.shape[1:]
            h = F.conv2d(
                x.reshape(1, n * c, hgt, wid),
                a.reshape(n * r, *a.shape[2:]),
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                groups=n,
            ).reshape(n, r, -1)  # (n, r, H'W')
            y3 = y.reshape(n, y.shape[1], -1)  # (n, out, H'W')
            if r == 1:
                out = torch.addcmul(y3, b, h, value=self.scale)
            else:
                out = torch.baddbmm(y3, b, h, alpha=self.scale)
            return out.reshape(y.shape)

    BankLayer.update = _Update  # the per-sample update as an autograd Function (tests)
    _LAYER_CLASS = BankLayer
    return BankLayer


def _unwrapped(module: Any) -> Any:
    """The base layer of a bank layer (an installed bank is replaced, not stacked)."""
    return module.base_layer if isinstance(module, _layer_class()) else module


class LoraBank:
    """The bank layers installed in a pipeline by :func:`install_bank`.

    Attributes
    ----------
    selectors : dict of str to object
        Per component (``"unet"``, ``"text_encoder"``): ``.index``, a
        ``torch.LongTensor`` of shape ``(batch,)`` naming the bank row of each
        batch element, or ``None`` for the bare base model.
    wrappers : dict of str to torch.nn.Module
        ``module path -> bank layer``; its ``lora_down`` is ``(M, r, in[, kh,
        kw])`` and ``lora_up`` ``(M, out, r)``.
    trainable : bool
        Whether the factors are parameters (training) or buffers (frozen).
    """

    def __init__(self, trainable: bool = False) -> None:
        self.selectors: dict[str, _Selector] = {c: _Selector() for c in SUPPORTED_COMPONENTS}
        self.wrappers: dict[str, Any] = {}
        self.trainable = trainable
        self._swapped: list[tuple[Any, str, Any]] = []

    def set_index(self, component: str, index: Any, groups: int | None = None) -> None:
        """Route batch element ``b`` of ``component`` to bank row ``index[b]`` (None: base).

        ``groups=k`` declares that ``index`` is ``arange(M).repeat_interleave(k)`` for the
        bank's ``M`` rows (each model's ``k`` samples together, in row order): the layers then
        use the factors as they are, without gathering a copy per sample.
        """
        sel = self.selectors[component]
        sel.index = index
        sel.groups = None if index is None else groups

    def set_factors(self, module: str, down: Any, up: Any) -> None:
        """Replace a module's factors (frozen: the tensors, which may require grad; trainable:
        copied into the parameters).

        Parameters
        ----------
        module : str
        down : torch.Tensor
            ``(M, r, in)`` (or ``(M, r, in, kh, kw)`` for a conv).
        up : torch.Tensor
            ``(M, out, r)``.
        """
        w = self.wrappers[module]
        if self.trainable:
            import torch

            with torch.no_grad():
                w.lora_down.copy_(torch.as_tensor(down).to(w.lora_down))
                w.lora_up.copy_(torch.as_tensor(up).to(w.lora_up))
        else:
            w.lora_down = down
            w.lora_up = up

    def parameters(self) -> list[Any]:
        """Every module's ``lora_down`` and ``lora_up``, in module order."""
        return [p for w in self.wrappers.values() for p in (w.lora_down, w.lora_up)]

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``module path -> (down (M, r, ...), up (M, out, r))`` as float32 numpy copies."""
        return {
            m: (
                w.lora_down.detach().float().cpu().numpy().copy(),
                w.lora_up.detach().float().cpu().numpy().copy(),
            )
            for m, w in self.wrappers.items()
        }

    def adapters(self, alpha: float | None = None) -> list[Adapter]:
        """One :class:`Adapter` per bank row (canonical module names).

        ``alpha`` is the models' LoRA alpha (the bank's ``scale = alpha / r``
        applies); ``None`` writes alpha = rank (the scale is folded into ``up``).
        """
        f = self.factors()
        m = next(iter(f.values()))[0].shape[0] if f else 0
        out = []
        for j in range(m):
            layers = {}
            for name, (down, up) in f.items():
                a = float(alpha) if alpha is not None else float(down.shape[1])
                layers[name] = LoraLayer(down=down[j].copy(), up=up[j].copy(), alpha=a)
            out.append(Adapter(layers=layers, metadata={}))
        return out

    def remove(self) -> None:
        """Put the base layers back (the bank is unusable afterwards)."""
        for parent, attr, base in reversed(self._swapped):
            setattr(parent, attr, base)
        self._swapped = []
        for sel in self.selectors.values():
            sel.index = None


def install_bank(
    pipe: Any,
    factors: Mapping[str, StackedLayer | tuple[Any, Any]],
    device: Any,
    dtype: Any,
    *,
    scale: float = 1.0,
    trainable: bool = False,
) -> LoraBank:
    """Replace the targeted modules of ``pipe`` with bank layers (until :meth:`LoraBank.remove`).

    Parameters
    ----------
    pipe : diffusers pipeline
    factors : mapping of str to StackedLayer or (down, up)
        Canonical module path (``"unet.<name>"``, ``"text_encoder.<name>"``) ->
        initial factors (numpy arrays or tensors), ``down`` ``(M, r, in[, kh,
        kw])``, ``up`` ``(M, out, r)``. Check them first
        (:func:`check_against_pipeline`) when they come from users.
    device : str or torch.device
    dtype : torch.dtype
    scale : float
        Multiplies every update (1: scale folded into ``up``; ``alpha / r``
        for training, as peft does).
    trainable : bool
        Factors as parameters (training) instead of buffers.

    Returns
    -------
    LoraBank
        Indices start as ``None`` (base model). A module that holds a bank
        layer already gets a fresh one around its base layer.
    """
    import torch

    bank = LoraBank(trainable=trainable)
    cls = _layer_class()
    try:
        for module, st in factors.items():
            down, up = (st.down, st.up) if isinstance(st, StackedLayer) else st
            current = resolve_module(pipe, module)
            if current is None:
                raise LayoutError("module is not in the pipeline", key=module)
            base = _unwrapped(current)
            comp, _, rest = module.partition(".")
            parent_path, _, attr = module.rpartition(".")
            parent = resolve_module(pipe, parent_path) if "." in rest else getattr(pipe, comp)
            down_t = torch.as_tensor(down).to(device=device, dtype=dtype)
            up_t = torch.as_tensor(up).to(device=device, dtype=dtype)
            if trainable:
                down_t, up_t = down_t.clone(), up_t.clone()
            layer = cls(base, down_t, up_t, bank.selectors[comp], scale, trainable)
            setattr(parent, attr, layer)
            bank._swapped.append((parent, attr, base))
            bank.wrappers[module] = layer
    except BaseException:
        bank.remove()
        raise
    return bank


@contextlib.contextmanager
def per_sample_lora(
    pipe: Any, stacked: Mapping[str, StackedLayer], device: Any, dtype: Any
) -> Iterator[LoraBank]:
    """A frozen bank for the duration of a ``with`` block (the base layers come back on exit).

    Parameters
    ----------
    pipe : diffusers.StableDiffusionPipeline
    stacked : mapping of str to StackedLayer
        Initial factors, scale folded in (see :func:`stack_adapters`).
    device : str
    dtype : torch.dtype

    Yields
    ------
    LoraBank
    """
    bank = install_bank(pipe, stacked, device, dtype)
    try:
        yield bank
    finally:
        bank.remove()


def lora_init(unet: Any, targets: Sequence[str], rank: int, alpha: float, seed: int) -> dict:
    """peft's initial ``A`` ``(r, in)`` per target after ``torch.manual_seed(seed)``.

    The paper's shared initialisation: every model of a dataset starts from
    these factors (``B = 0``). Computed on a copy of the UNet, so the UNet
    itself is not touched.
    """
    import torch
    from peft import LoraConfig

    probe = copy.deepcopy(unet).cpu()
    for name in targets:  # an installed bank: initialise around the base layer
        parent_name, _, leaf = name.rpartition(".")
        parent = probe.get_submodule(parent_name) if parent_name else probe
        setattr(parent, leaf, _unwrapped(getattr(parent, leaf)))
    torch.manual_seed(int(seed))
    probe.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    )
    params = dict(probe.named_parameters())
    return {t: params[f"{t}.lora_A.default.weight"].detach().clone() for t in targets}
