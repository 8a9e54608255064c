"""The concept-pack protocol and the pieces it is made of.

A *concept* is what one model of a dataset of models encodes: one person's
identity, one dog breed, one car type. A :class:`ConceptPack` tells the rest of
w2wkit how to prompt for the concept, which attributes its instances carry, how
many principal components suit it, which image region matters (a mask maker)
and, for the miniature world, how to draw instances procedurally.

This module imports only numpy; packs load their generators lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "AttributeSpec",
    "ConceptPack",
    "Instance",
    "ProceduralGenerator",
    "SimplePack",
]


@dataclass(frozen=True)
class AttributeSpec:
    """One binary attribute of a concept's instances.

    Parameters
    ----------
    name : str
        Identifier used in label files and direction names (``"beard"``).
    phrase : str
        Words that name the attribute in a caption when it is present
        (``"a beard"``, ``"floppy ears"``).
    description : str
        What the attribute looks like, for documentation.
    prevalence : float
        Approximate fraction of instances that have it.
    adjective : bool
        True when ``phrase`` is an adjective placed before the class noun
        ("an *old* person") rather than a "with ..." phrase.
    negative : str
        Optional words naming the absence ("young" for ``old``); empty if the
        absence is not named in captions.
    """

    name: str
    phrase: str
    description: str = ""
    prevalence: float = 0.5
    adjective: bool = False
    negative: str = ""


@dataclass(frozen=True)
class Instance:
    """One instance of a concept (an identity, a breed), defined by parameters.

    Parameters
    ----------
    concept : str
        Name of the concept (``"identity"``).
    index : int
        Index of the instance in its generator (with ``seed``, it recreates it).
    seed : int
        Seed of the generator that made it.
    attributes : Mapping of str to bool
        Binary attributes, in the order of the generator's schema.
    params : Mapping of str to float
        Continuous ground-truth parameters, in the generator's fixed order.
    """

    concept: str
    index: int
    seed: int
    attributes: Mapping[str, bool]
    params: Mapping[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Stable identifier, e.g. ``"identity-s0-000042"``."""
        return f"{self.concept}-s{self.seed}-{self.index:06d}"

    def attribute_vector(self) -> np.ndarray:
        """Binary attributes as an array of shape ``(n_attributes,)``, int8."""
        return np.array([int(v) for v in self.attributes.values()], dtype=np.int8)

    def vector(self) -> np.ndarray:
        """Ground-truth parameter vector, shape ``(n_attributes + n_params,)``.

        Binary attributes as 0/1 first, then the continuous parameters.
        """
        return np.concatenate(
            [
                self.attribute_vector().astype(np.float64),
                np.array(list(self.params.values()), dtype=np.float64),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary; :meth:`from_dict` inverts it."""
        return {
            "concept": self.concept,
            "index": self.index,
            "seed": self.seed,
            "attributes": {k: bool(v) for k, v in self.attributes.items()},
            "params": {k: float(v) for k, v in self.params.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Instance:
        """Rebuild an instance from :meth:`to_dict` output."""
        return cls(
            concept=str(data["concept"]),
            index=int(data["index"]),
            seed=int(data["seed"]),
            attributes={k: bool(v) for k, v in data["attributes"].items()},
            params={k: float(v) for k, v in data.get("params", {}).items()},
        )


@runtime_checkable
class ProceduralGenerator(Protocol):
    """Draws instances of a concept and renders pictures of them.

    Every method is deterministic given its seed.
    """

    concept: str
    attributes: tuple[AttributeSpec, ...]
    param_names: tuple[str, ...]

    def instance(self, index: int, seed: int = 0) -> Instance:
        """The instance number ``index`` of the population drawn with ``seed``."""
        ...

    def instances(self, n: int, seed: int = 0, start: int = 0) -> list[Instance]:
        """Instances ``start`` .. ``start + n - 1``."""
        ...

    def render(
        self,
        instance: Instance,
        n_images: int,
        seed: int = 0,
        size: int = 32,
        canonical: bool = False,
    ) -> np.ndarray:
        """Pictures of one instance under random nuisance (none if ``canonical``).

        Returns
        -------
        numpy.ndarray
            Shape ``(n_images, size, size, 3)``, uint8 RGB.
        """
        ...

    def caption(
        self, instance: Instance, rng: np.random.Generator | None = None, drop: float = 0.0
    ) -> str:
        """A caption naming the class and the instance's attributes.

        ``drop`` is the probability of leaving out each attribute phrase
        (``rng`` draws which); ``0`` names all of them.
        """
        ...


MaskMaker = Callable[[np.ndarray], np.ndarray]


@runtime_checkable
class ConceptPack(Protocol):
    """What w2wkit needs to know about a concept.

    Attributes
    ----------
    name : str
        Registry name (``"identity"``, ``"dog"``).
    instance_prompt : str
        Prompt of one customised instance, with the rare token (``"sks person"``).
    class_prompt : str
        Prompt of the class (``"person"``), used for prior preservation.
    attributes : tuple of AttributeSpec
        Attribute schema of the concept's label files.
    n_components : int
        Default number of principal components for sampling and editing.
    n_components_inversion : int
        Default number of principal components for inversion.
    description : str
        One line for listings.
    prompt_template : str
        The sentence the instance prompt is said in (``"a photo of {}"``):
        :func:`w2wkit.concepts.full_prompt` fills it in. The miniature world
        trains its zoo with the full prompt, and the evaluation prompts with it.
    transient_attributes : tuple of str
        Attributes one instance shows in some pictures and not in others
        (identity: beard, glasses, lipstick, age); an embedder of the concept
        should see the same instance through them. Empty when there are none
        (dog breeds).
    """

    name: str
    instance_prompt: str
    class_prompt: str
    attributes: tuple[AttributeSpec, ...]
    n_components: int
    n_components_inversion: int
    description: str
    prompt_template: str
    transient_attributes: tuple[str, ...]

    def mask(self, images: np.ndarray) -> np.ndarray | None:
        """Region that matters, shape ``(n, H, W)`` float in [0, 1], or None.

        ``images`` has shape ``(n, H, W, 3)``.
        """
        ...

    def plausible(self, attributes: Mapping[str, bool], name: str) -> bool:
        """Whether attribute ``name`` may be toggled on an instance with ``attributes``.

        False where the population never shows the result (no beards on women).
        """
        ...

    def generator(self) -> ProceduralGenerator | None:
        """The procedural generator of the miniature world, or None."""
        ...


@dataclass
class SimplePack:
    """A ready-made :class:`ConceptPack` from plain values.

    Third-party packs can instantiate this instead of writing a class.

    Parameters
    ----------
    name, instance_prompt, class_prompt, attributes, n_components,
    n_components_inversion, description
        See :class:`ConceptPack`.
    make_generator : callable, optional
        Zero-argument factory returning the procedural generator.
    mask_maker : callable, optional
        ``images (n, H, W, 3) -> mask (n, H, W)``.
    prompt_template, transient_attributes
        See :class:`ConceptPack` (defaults: ``"a photo of {}"``, none).
    plausibility : callable, optional
        ``(attributes, name) -> bool``, see :meth:`ConceptPack.plausible`
        (default: every toggle is plausible).
    """

    name: str
    instance_prompt: str
    class_prompt: str
    attributes: tuple[AttributeSpec, ...] = ()
    n_components: int = 1000
    n_components_inversion: int = 1000
    description: str = ""
    make_generator: Callable[[], ProceduralGenerator] | None = None
    mask_maker: MaskMaker | None = None
    prompt_template: str = "a photo of {}"
    transient_attributes: tuple[str, ...] = ()
    plausibility: Callable[[Mapping[str, bool], str], bool] | None = None

    def mask(self, images: np.ndarray) -> np.ndarray | None:
        """See :meth:`ConceptPack.mask`."""
        return None if self.mask_maker is None else self.mask_maker(images)

    def plausible(self, attributes: Mapping[str, bool], name: str) -> bool:
        """See :meth:`ConceptPack.plausible`.

        A rule that needs an attribute the caller does not know counts the edit as plausible.
        """
        if self.plausibility is None:
            return True
        try:
            return bool(self.plausibility(attributes, name))
        except KeyError:
            return True

    def generator(self) -> ProceduralGenerator | None:
        """See :meth:`ConceptPack.generator`."""
        return None if self.make_generator is None else self.make_generator()

    @property
    def attribute_names(self) -> Sequence[str]:
        """Names of the attributes, in schema order."""
        return [a.name for a in self.attributes]
