"""Built-in concept pack: dog breeds."""

from __future__ import annotations

from w2wkit.concepts.base import SimplePack
from w2wkit.concepts.dog.generator import DOG_ATTRIBUTES, DogGenerator

__all__ = ["PACK"]


PACK = SimplePack(
    name="dog",
    instance_prompt="sks dog",
    class_prompt="dog",
    attributes=DOG_ATTRIBUTES,
    n_components=100,
    n_components_inversion=100,
    description="dog breeds with breed-level attributes (size, ears, coat, snout, legs)",
    make_generator=DogGenerator,
)
