"""What a world build makes, and how big: the profiles and the settings they imply.

A :class:`WorldProfile` holds the settings of every part of the build (base
model, zoo, evaluators) and its sizes (models, held-out instances, evaluator
training sets, the fidelity test). :func:`profile` names the built-in ones
(``full``, ``full-gpu``, ``full-cpu``, ``micro``); :func:`profile_from_log`
reads the one a build log records; :func:`zoo_jobs_for` lists the zoo's
models of a profile (:func:`w2wkit.world.measure.fidelity_settings` derives
the fidelity test's settings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from w2wkit.errors import W2WError
from w2wkit.world import CONCEPTS
from w2wkit.world.base_model import BaseSettings
from w2wkit.world.evaluators import EvalSettings
from w2wkit.world.zoo import ZooSettings

__all__ = [
    "CPU_BASE_STEPS",
    "CPU_BASE_THREADS",
    "FULL_ZOO_RECIPE",
    "GPU_BASE_BATCH",
    "GPU_BASE_LR",
    "GPU_BASE_STEPS",
    "PROFILES",
    "WorldProfile",
    "profile",
    "profile_from_log",
    "zoo_jobs_for",
]

#: Zoo recipe of the ``full`` profile, chosen by measurement on the shipped base (see
#: docs/world.md, "Choosing the zoo recipe"): the paper's scale (alpha 27 at rank 1) and
#: batch 1, 600 steps at lr 1e-3, LoRA on to_q/to_k/to_v and the feed-forward input.
FULL_ZOO_RECIPE: dict[str, Any] = {
    "rank": 1,
    "alpha": 27.0,
    "lr": 1e-3,
    "steps": 600,
    "batch": 1,
    "targets": ("to_q", "to_k", "to_v", "proj"),
}


@dataclass
class WorldProfile:
    """Everything ``world build`` makes, and how big.

    Attributes
    ----------
    name : str
    base : BaseSettings
    zoo : ZooSettings
    evals : EvalSettings
    n_identities, n_dogs : models in the zoo (identities ``0 ..`` of seed
        ``seed``; breeds of the default catalogue).
    n_heldout, heldout_images : held-out identities (``n_identities ..``) and renders each.
    eval_identities, eval_id_images : training set of the identity evaluators
        (population ``2000 + seed``, never in the zoo or the held-out set).
    eval_id_vary : probability with which each transient attribute (beard,
        glasses, lipstick, age) is toggled per training picture of the identity
        embedder (its own renders; the attribute classifier trains on the
        unvaried ones). 0 = world v1's embedder, for which a perfect beard edit
        scored ID ~0.3 against its own unedited picture (v1.1's: ~0.9).
    eval_id_vary_tied : toggle as :meth:`IdentityGenerator.edited` does (ageing
        greys the hair; default) rather than the flag alone (world v1.1's
        embedder, for which a perfect ageing edit scored ID 0.40).
    eval_dog_catalogues, eval_dog_images, eval_dog_breeds : dog evaluator
        training breeds (the first ``eval_dog_breeds`` of catalogues
        ``seed .. seed + k - 1``, which include the zoo's; the test breeds are
        catalogue ``99 + seed``).
    fidelity_models, candidates, fidelity_seeds, ref_images : zoo fidelity test.
    sample_steps, guidance : DDIM steps and CFG scale of generations.
    """

    name: str
    base: BaseSettings
    zoo: ZooSettings
    evals: EvalSettings
    # 1,000 + 200 models (the minimum): with the 28-module zoo recipe a model is
    # 10,240 numbers (20 KiB in float16), so 1,200 models are 24.6 MB and the packed
    # world ~39 MB of the 40 MB allowed (1,340 models would be ~41 MB)
    n_identities: int = 1000
    n_dogs: int = 200
    n_heldout: int = 100
    heldout_images: int = 10
    eval_identities: int = 4000
    eval_id_images: int = 8
    eval_id_vary: float = 0.3
    eval_id_vary_tied: bool = True
    eval_dog_catalogues: int = 5
    eval_dog_images: int = 10
    eval_dog_breeds: int = 240
    eval_test_instances: int = 200
    fidelity_models: int = 200
    candidates: int = 50
    # 8 pictures per model and 16 references per instance (world v1 was measured with 2
    # and 4): on the same 50 v1 models top-1 rose from 0.68 to 0.76-0.78 (docs/world.md)
    fidelity_seeds: int = 8
    ref_images: int = 16
    sample_steps: int = 20
    guidance: float = 3.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    def models(self) -> dict[str, int]:
        """Zoo models of each concept of the world (:data:`w2wkit.world.CONCEPTS`)."""
        return dict(zip(CONCEPTS, (self.n_identities, self.n_dogs), strict=True))


#: ``full-gpu``: the UNet batch of the base (``full``: 8, sized for the 60-minute CPU
#: budget). On an H100 a step of the miniature UNet took 33 ms at batch 8 (world v0's
#: build log), which is launch-bound, so batch 64 is expected to cost little more per
#: step (not yet measured) and show the base 8x more pictures; the learning rate is
#: raised with the batch.
GPU_BASE_BATCH = 64
GPU_BASE_LR = 1e-3
#: ``full-gpu`` UNet step cap (``full``: 8,000). A ``--budget`` trims the run to the
#: steps that fit (measured step time), so the cap only matters on a fast card.
GPU_BASE_STEPS = 12_000

#: ``full-cpu``: the base trained with 2 torch threads (measured on this 2-core VM:
#: 0.133 s per UNet step of batch 8, against 0.36-0.41 s with one thread on a loaded
#: machine) and up to this many UNet steps, which a ``--budget`` trims to what fits.
#: Continuing the shipped base by 11,209 such steps lifted zoo fidelity from 0.42 to
#: 0.54 (identities) and 0.46 to 0.58 (dogs) in the recipe probe (docs/world.md).
CPU_BASE_THREADS = 2
CPU_BASE_STEPS = 24_000

PROFILES = ("full", "full-gpu", "full-cpu", "micro")


def profile(name: str, seed: int = 0, device: str = "cpu") -> WorldProfile:
    """``full`` (the documented world), ``full-gpu`` or ``micro`` (seconds, for tests and CI).

    ``full-gpu`` is ``full`` with the base UNet trained at batch
    :data:`GPU_BASE_BATCH` (lr :data:`GPU_BASE_LR`) for up to
    :data:`GPU_BASE_STEPS` steps: 8x the pictures a step, for a GPU build; on a
    CPU it would take ~8x the 60-minute budget.
    ``full-cpu`` is ``full`` with the base trained on :data:`CPU_BASE_THREADS`
    threads for up to :data:`CPU_BASE_STEPS` steps (give ``--budget`` so that
    they fit the hour).
    """
    if name in ("full", "full-gpu", "full-cpu"):
        base = BaseSettings(seed=seed)
        if name == "full-gpu":
            base = replace(
                base, unet_batch=GPU_BASE_BATCH, unet_lr=GPU_BASE_LR, unet_steps=GPU_BASE_STEPS
            )
        if name == "full-cpu":
            base = replace(base, threads=CPU_BASE_THREADS, unet_steps=CPU_BASE_STEPS)
        return WorldProfile(
            name=name,
            base=base,
            zoo=ZooSettings(seed=seed, device=device, **FULL_ZOO_RECIPE),
            evals=EvalSettings(steps=3000, batch=256, seed=seed, device=device),
        )
    if name == "micro":
        return WorldProfile(
            name="micro",
            base=BaseSettings.micro(seed=seed),
            zoo=ZooSettings(
                **{**FULL_ZOO_RECIPE, "steps": 3, "batch": 2},
                n_images=3,
                seed=seed,
                device=device,
                chunk=4,
            ),
            evals=EvalSettings(width=8, emb_dim=16, steps=20, batch=16, seed=seed, device=device),
            n_identities=6,
            n_dogs=3,
            n_heldout=3,
            heldout_images=3,
            eval_identities=12,
            eval_id_images=2,
            eval_dog_catalogues=1,
            eval_dog_images=2,
            eval_dog_breeds=6,
            eval_test_instances=4,
            fidelity_models=3,
            candidates=3,
            fidelity_seeds=2,
            ref_images=2,
            sample_steps=2,
        )
    raise W2WError(f"unknown profile '{name}' (known: {', '.join(PROFILES)})", key="profile")


def profile_from_log(d: dict[str, Any]) -> WorldProfile:
    """The :class:`WorldProfile` a build log records (fields this version lacks dropped)."""
    prof = profile(d["name"], seed=int(d["base"]["seed"]))
    scalars = {
        k: v
        for k, v in d.items()
        if k in WorldProfile.__dataclass_fields__ and not isinstance(v, dict)
    }
    evals = {k: v for k, v in d.get("evals", {}).items() if k in EvalSettings.__dataclass_fields__}
    # the zoo recipe the build ran (a profile's default may have changed since)
    zoo = {k: v for k, v in d.get("zoo", {}).items() if k in ZooSettings.__dataclass_fields__}
    if isinstance(zoo.get("targets"), list):
        zoo["targets"] = tuple(zoo["targets"])
    # worlds built before eval_id_vary existed trained the embedder on unvaried renders
    scalars.setdefault("eval_id_vary", 0.0)
    # ... and before eval_id_vary_tied, toggled the flags alone
    scalars.setdefault("eval_id_vary_tied", False)
    return replace(
        prof, **scalars, evals=replace(prof.evals, **evals), zoo=replace(prof.zoo, **zoo)
    )


def zoo_jobs_for(prof: WorldProfile) -> dict[str, list]:
    """The zoo's models of each concept (:class:`w2wkit.world.zoo.ZooJob` lists), in build order.

    Instances ``0 ..`` of each concept: of the population drawn with the
    profile's seed, or of the default catalogue for a catalogue generator (dog
    breeds). The zoo numbers (noise seeds) run on across the concepts.

    The zoo LoRAs are trained with :func:`w2wkit.concepts.full_prompt`: the base
    model's captions all start with "a photo of", and training with the bare
    "sks person" (the first build) put the LoRAs off that distribution. Measured
    on the shipped base (docs/world.md, "Choosing the zoo recipe"): own ID score
    0.43 -> 0.53 and intra / inter ID 0.14 / 0.23 -> 0.31 / 0.19 for identities,
    fidelity 0.08 -> 0.42 for dogs. The shipped world records the prompt.
    """
    from w2wkit.world.pictures import generator
    from w2wkit.world.zoo import zoo_jobs

    out, first = {}, 0
    for concept, n in prof.models().items():
        seed = 0 if hasattr(generator(concept), "n_breeds") else prof.base.seed
        out[concept] = zoo_jobs(concept, n, inst_seed=seed, first=first)
        first += n
    return out
