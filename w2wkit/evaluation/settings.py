"""How much evaluation to do: :class:`EvalSettings` and the named :data:`PROFILES`."""

from __future__ import annotations

from dataclasses import dataclass

from w2wkit.evaluation.stylise import STYLES

__all__ = ["PROFILES", "EvalSettings"]


@dataclass
class EvalSettings:
    """How much evaluation to do.

    Attributes
    ----------
    n_heldout : int
        Held-out identities evaluated (editing and inversion).
    n_components : int
        Components of the space for sampling and editing (capped at N-1);
        200 hold 81% of the variance of the shipped world's 1,100 identities.
    inversion_space_components : int
        Components of the space inversion uses (capped at N-1), fitted
        separately when larger (the paper: 1,000 for editing, 10,000 for
        inversion).
    inversion_components, ood_components : int or None
        ``k`` for in-distribution and stylised inputs (capped at the space's).
    inversion_steps, inversion_lr, ood_steps, ood_lr : int or float or None
        Inversion recipe; ``None`` takes :func:`w2wkit.invert.default_settings`
        (standard and ``ood``), the user-facing defaults of ``w2wkit invert``.
    dreambooth_steps : int or None
        DreamBooth baselines' steps (None: the zoo recipe's).
    n_train_images : int or None
        Pictures of the multi-image DreamBooth baseline (None: the zoo recipe's).
    render_steps, guidance : rendering.
    seeds : int
        Renders per model (seeds 0..seeds-1).
    n_eval_images : int
        Real renders of each held-out identity the ID score compares with.
    edit_attributes : tuple of str
        Attributes edited (those with labels).
    edit_strength : float
        Strength (training standard deviations) of the headline numbers when
        ``edit_calibration`` is 0.
    edit_sweep : tuple of float
        Strengths of the w2w success / ID trade-off curve, and the candidates
        of the calibration.
    edit_calibration : int
        Zoo (training) models lacking the attribute on which each attribute's
        strength is calibrated: the smallest strength of ``edit_sweep`` whose
        edits the attribute classifier accepts at least ``edit_target`` of the
        time (else the strength with the highest success). 0: ``edit_strength``
        for every attribute. The held-out identities are never used for it.
    edit_target : float
        Success rate the calibration asks for.
    edit_calibration_pool : str
        Models the strengths are calibrated on: ``"heldout"`` (default;
        multi-image DreamBooth models, trained like the edited ones, of the
        last held-out identities, which are never evaluated; an error when
        the ``n_heldout`` evaluated identities leave none) or ``"zoo"``
        (training models of the space lacking the attribute). Zoo models lie
        in the space; held-out models also have a residual outside it, which
        the edit keeps: on world v1.1 zoo-calibrated strengths gave 0.723
        success on 16 held-out identities, held-out-calibrated ones 0.816.
    edit_calibration_identities : int
        Size of the ``"heldout"`` calibration pool (capped at the held-out
        identities left after the ``n_heldout`` evaluated ones).
    edit_plausible : bool
        Edit only models for which the attribute is plausible: not those
        holding an attribute value under which the zoo never shows it (e.g.
        no beards on women; :func:`excluded_by`). Applies to the calibration
        pool and the held-out identities alike; the results list the rule.
    disentangle_threshold : float
        An edit is made orthogonal to every attribute whose label
        correlation with it is at least this in absolute value.
    edit_inject_t : float or None
        Delayed injection threshold for w2w edits: the unedited model while
        ``t > T``, the edited one after (None: edited throughout). Default 700:
        on 17 held-out identities of world v1 it raised success 0.695 -> 0.724
        and the ID score 0.501 -> 0.560 against editing throughout.
    n_samples : int
        Sampled models.
    scaling_sizes : tuple of int
        Numbers of models in the space (capped at N).
    scaling_heldout : int
        Held-out identities inverted per space size (and per ``k`` of the sweep).
    inversion_k_sweep : tuple of int
        Numbers of optimised components of the inversion sweep (full space).
    fidelity_candidates : int
        Candidates of the zoo fidelity identification.
    ood_heldout : int
        Held-out identities for stylised inputs.
    styles : tuple of str
    batch_size : int
        Renderer batch.
    seed : int
    device : str
    threads : int
        torch threads on the CPU (1: several threads on a small, busy CPU
        are many times slower than one).
    """

    n_heldout: int = 6
    n_components: int = 200
    inversion_space_components: int = 1000
    inversion_components: int | None = None
    ood_components: int | None = None
    inversion_steps: int | None = None
    inversion_lr: float | None = None
    ood_steps: int | None = None
    ood_lr: float | None = None
    dreambooth_steps: int | None = None
    n_train_images: int | None = None
    render_steps: int = 20
    guidance: float = 3.0
    seeds: int = 4
    n_eval_images: int = 6
    edit_attributes: tuple[str, ...] = ("beard", "glasses", "old")
    edit_strength: float = 2.0
    edit_sweep: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
    edit_calibration: int = 8
    edit_target: float = 0.8
    edit_calibration_pool: str = "heldout"
    edit_calibration_identities: int = 16
    edit_plausible: bool = True
    disentangle_threshold: float = 0.15
    edit_inject_t: float | None = 700.0
    n_samples: int = 8
    scaling_sizes: tuple[int, ...] = (50, 200, 1000)
    scaling_heldout: int = 3
    inversion_k_sweep: tuple[int, ...] = (10, 30, 100, 300, 1000)
    fidelity_candidates: int = 50
    ood_heldout: int = 3
    styles: tuple[str, ...] = STYLES
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    threads: int = 1


#: Named settings: ``tiny`` (CI, minutes on a micro world), ``quick``, ``full``.
PROFILES: dict[str, EvalSettings] = {
    "tiny": EvalSettings(
        n_heldout=2,
        n_components=6,
        inversion_space_components=8,
        inversion_components=6,
        ood_components=4,
        inversion_steps=4,
        ood_steps=4,
        dreambooth_steps=3,
        n_train_images=3,
        render_steps=3,
        seeds=2,
        n_eval_images=2,
        n_samples=3,
        scaling_sizes=(6, 11),
        scaling_heldout=1,
        inversion_k_sweep=(2, 6),
        fidelity_candidates=6,
        ood_heldout=1,
        styles=("posterised", "line drawing"),
        edit_sweep=(1.0,),
        edit_calibration=2,
        edit_calibration_pool="zoo",
        batch_size=16,
    ),
    # quick: a smaller held-out calibration pool (6 DreamBooth trainings, ~2.5 min on a CPU)
    "quick": EvalSettings(
        n_heldout=4, ood_heldout=2, scaling_heldout=2, n_samples=6, edit_calibration_identities=6
    ),
    "full": EvalSettings(
        n_heldout=50,
        seeds=8,
        n_eval_images=10,
        n_samples=32,
        scaling_heldout=10,
        ood_heldout=20,
        render_steps=25,
    ),
}
