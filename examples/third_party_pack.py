"""A third-party concept pack in a few dozen lines: procedural houses.

A pack says how to prompt for a concept, which attributes label its models,
and (for a miniature world) how to draw instances. To make it available to
every w2wkit command, advertise it from your own distribution's pyproject.toml:

    [project.entry-points."w2wkit.concepts"]
    house = "my_houses:PACK"

or, inside one Python process, call ``w2wkit.concepts.register_pack(PACK)``.
Run this file to register the pack and save a grid of houses:
``python examples/third_party_pack.py houses.png``.
"""

from __future__ import annotations

import sys

import numpy as np

from w2wkit.concepts import AttributeSpec, Instance, SimplePack, get_pack, register_pack
from w2wkit.concepts.drawing import Nuisance, Sketch, caption_of, compose

ATTRS = (
    AttributeSpec("tall", "tall", "two storeys", 0.5, adjective=True),
    AttributeSpec("red_roof", "a red roof", "red instead of grey roof", 0.5),
    AttributeSpec("chimney", "a chimney", "a chimney on the roof", 0.5),
)


class HouseGenerator:
    concept, attributes, param_names = "house", ATTRS, ("width", "wall")

    def instance(self, index: int, seed: int = 0) -> Instance:
        rng = np.random.default_rng([seed, index])
        attrs = {a.name: bool(rng.random() < a.prevalence) for a in ATTRS}
        params = {"width": rng.uniform(0.25, 0.35), "wall": rng.uniform(0.5, 0.95)}
        return Instance(self.concept, index, seed, attrs, params)

    def instances(self, n: int, seed: int = 0, start: int = 0) -> list[Instance]:
        return [self.instance(i, seed) for i in range(start, start + n)]

    def render(self, inst, n_images, seed=0, size=32, canonical=False) -> np.ndarray:
        rng = np.random.default_rng([seed, inst.index, inst.seed])
        a, w, wall = inst.attributes, inst.params["width"], inst.params["wall"]
        top = 0.35 if a["tall"] else 0.55
        out = np.empty((n_images, size, size, 3), np.uint8)
        for i in range(n_images):
            nz = Nuisance() if canonical else Nuisance.draw(rng, rotation=3.0)
            sk = Sketch(size)
            roof = (0.7, 0.1, 0.1) if a["red_roof"] else (0.3, 0.3, 0.33)
            if a["chimney"]:
                sk.rect(0.5 + 0.4 * w, top - 0.2, 0.5 + 0.55 * w, top, (0.4, 0.25, 0.2))
            sk.rect(0.5 - w, top, 0.5 + w, 0.85, (wall, wall * 0.9, 0.7))
            sk.polygon([(0.5 - 1.15 * w, top), (0.5, top - 0.22), (0.5 + 1.15 * w, top)], roof)
            sk.rect(0.47, 0.7, 0.53, 0.85, (0.3, 0.2, 0.1))
            out[i] = compose(sk, nz)
        return out

    def caption(self, inst, rng=None, drop=0.0) -> str:
        return caption_of("house", ATTRS, inst.attributes, rng, drop)


PACK = SimplePack(
    name="house",
    instance_prompt="sks house",
    class_prompt="house",
    attributes=ATTRS,
    n_components=50,
    n_components_inversion=50,
    description="procedural houses (third-party example)",
    make_generator=HouseGenerator,
)

if __name__ == "__main__":
    register_pack(PACK, overwrite=True)
    gen = get_pack("house").generator()
    houses = gen.instances(6)
    grid = np.concatenate([np.concatenate(list(gen.render(h, 6)), axis=1) for h in houses])
    for h in houses:
        print(gen.caption(h))
    if len(sys.argv) > 1:
        from PIL import Image

        Image.fromarray(grid).save(sys.argv[1])
