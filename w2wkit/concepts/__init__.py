"""Concept packs: what a dataset of models is about, and how to prompt for it.

Packs are found in three places, in this order of precedence:

1. packs registered at run time with :func:`register_pack`;
2. packs advertised by installed distributions in the ``w2wkit.concepts``
   entry-point group (the object an entry point names may be a pack, a pack
   class or a zero-argument factory returning a pack);
3. the built-in packs ``identity`` and ``dog``.

>>> from w2wkit.concepts import get_pack
>>> get_pack("identity").instance_prompt
'sks person'

A third-party distribution registers a pack in its ``pyproject.toml``::

    [project.entry-points."w2wkit.concepts"]
    car = "my_package.cars:PACK"

(see ``examples/third_party_pack.py``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from w2wkit.concepts.base import (
    AttributeSpec,
    ConceptPack,
    Instance,
    ProceduralGenerator,
    SimplePack,
)
from w2wkit.errors import W2WError

__all__ = [
    "ENTRY_POINT_GROUP",
    "AttributeSpec",
    "ConceptError",
    "ConceptPack",
    "Instance",
    "ProceduralGenerator",
    "SimplePack",
    "full_prompt",
    "get_pack",
    "list_packs",
    "register_pack",
]

ENTRY_POINT_GROUP = "w2wkit.concepts"

_BUILTIN = {
    "identity": "w2wkit.concepts.identity:PACK",
    "dog": "w2wkit.concepts.dog:PACK",
}
_RUNTIME: dict[str, ConceptPack] = {}
_REQUIRED = (
    "name",
    "instance_prompt",
    "class_prompt",
    "attributes",
    "n_components",
    "n_components_inversion",
)


class ConceptError(W2WError):
    """An unknown or malformed concept pack."""


def _load_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def _as_pack(obj: Any, origin: str) -> ConceptPack:
    """Accept a pack, a pack class or a zero-argument factory."""
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "instance_prompt")):
        obj = obj()
    missing = [k for k in _REQUIRED if not hasattr(obj, k)]
    if missing:
        raise ConceptError(
            f"concept pack from {origin} lacks {', '.join(missing)}",
            hint="see w2wkit.concepts.ConceptPack",
        )
    return obj  # type: ignore[no-any-return]


def _entry_points() -> dict[str, Any]:
    """Entry points of the ``w2wkit.concepts`` group, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register_pack(pack: ConceptPack, *, overwrite: bool = False) -> ConceptPack:
    """Register a pack at run time (takes precedence over installed packs).

    Parameters
    ----------
    pack : ConceptPack
        The pack; its ``name`` is the registry key.
    overwrite : bool
        Replace a pack registered earlier under the same name.

    Returns
    -------
    ConceptPack
        ``pack``, so this can be used as a decorator-like call.
    """
    pack = _as_pack(pack, f"register_pack({getattr(pack, 'name', pack)!r})")
    if pack.name in _RUNTIME and not overwrite:
        raise ConceptError(
            f"concept pack '{pack.name}' is already registered", hint="pass `overwrite=True`"
        )
    _RUNTIME[pack.name] = pack
    return pack


def list_packs() -> list[str]:
    """Names of all known packs (run-time, installed and built-in), sorted."""
    return sorted({*_RUNTIME, *_entry_points(), *_BUILTIN})


def get_pack(name: str | ConceptPack) -> ConceptPack:
    """The concept pack called ``name``.

    Parameters
    ----------
    name : str or ConceptPack
        A registry name (``"identity"``, ``"dog"``, or an installed pack's
        name); a pack object is returned as is.

    Raises
    ------
    ConceptError
        If no pack has that name (the message lists the known ones), or the
        installed pack cannot be loaded.
    """
    if not isinstance(name, str):
        return _as_pack(name, repr(name))
    if name in _RUNTIME:
        return _RUNTIME[name]
    eps = _entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as exc:  # a broken third-party package
            raise ConceptError(
                f"concept pack '{name}' ({eps[name].value}) failed to load: "
                f"{type(exc).__name__}: {exc}",
                key=ENTRY_POINT_GROUP,
            ) from exc
        return _as_pack(obj, f"entry point '{name} = {eps[name].value}'")
    if name in _BUILTIN:
        return _as_pack(_load_target(_BUILTIN[name]), _BUILTIN[name])
    raise ConceptError(
        f"unknown concept '{name}'",
        hint=f"known concepts: {', '.join(list_packs())}",
    )


def full_prompt(pack: str | ConceptPack) -> str:
    """The instance prompt said in the pack's sentence: ``"a photo of sks person"``.

    The miniature world's zoo LoRAs are trained with it (its base model's
    captions all start with "a photo of"), and the evaluation prompts with it.

    Parameters
    ----------
    pack : str or ConceptPack
        A pack or its registry name. A pack without ``prompt_template`` (an
        older third-party one) gets ``"a photo of {}"``.

    >>> full_prompt("dog")
    'a photo of sks dog'
    """
    p = get_pack(pack)
    return str(getattr(p, "prompt_template", "a photo of {}")).format(p.instance_prompt)
