"""The miniature world: a tiny diffusion model, its LoRA zoo and evaluators.

The procedural pictures come from the concept packs' generators
(:func:`w2wkit.concepts.get_pack` ``(name).generator()``); this package never
names a concept. Modules, by what they hold:

- :mod:`~w2wkit.world.base_model`: the miniature base pipeline and its training;
- :mod:`~w2wkit.world.pictures`: procedural pictures of many instances, in worker processes;
- :mod:`~w2wkit.world.tokenizer`: the world's small word-level tokenizer;
- :mod:`~w2wkit.world.lora`, :mod:`~w2wkit.world.zoo`: one LoRA per instance, and many at once;
- :mod:`~w2wkit.world.evaluators`: attribute classifiers and identity embedders;
- :mod:`~w2wkit.world.measure`: zoo fidelity;
- :mod:`~w2wkit.world.profiles`: what a build makes, and how big;
- :mod:`~w2wkit.world.builder`: the whole build, phase by phase;
- :mod:`~w2wkit.world.retrain`: a built world's zoo or embedder trained again;
- :mod:`~w2wkit.world.shipped`: the packed world, its manifest and :func:`load_world`.

torch, diffusers and peft are imported inside the functions that need them.
"""

__all__ = ["CONCEPTS", "HELDOUT_CONCEPT"]

#: The concept packs the miniature world is made of, in build order (the zoo's models
#: of the first come first). The one place in ``world/`` that names concepts: the rest
#: asks their packs (:func:`w2wkit.concepts.get_pack`) for generator, prompt and rules.
CONCEPTS: tuple[str, ...] = ("identity", "dog")
#: The concept with held-out instances: its evaluators are tested on them, and the build
#: measures the PCA of its zoo, models sampled from it and perfect transient edits.
HELDOUT_CONCEPT: str = "identity"
