"""Evaluation of weights2weights in the miniature world: the paper's tables.

``run_eval(world, settings, out_dir)`` measures, on held-out identities
(mean +- std over identities):

* **editing** (>= 3 attributes, strengths in training standard deviations,
  calibrated per attribute on zoo models): ID score of the edited model's
  renders to the unedited model's renders (same seeds), attribute success rate
  (the attribute classifier on
  the edited renders, for identities that lacked the attribute), and pixel
  RMSE to the unedited renders; w2w (disentangled) vs prompting vs the
  undisentangled direction;
* **inversion**: ID score of the inverted model's renders against *other*
  renders of the identity (new poses, lighting, expressions) and wall time;
  w2w from one picture vs DreamBooth LoRA on that one picture vs DreamBooth
  LoRA on ``n_images`` pictures (the zoo recipe); then the same on stylised
  inputs (posterised, painted, line drawing) for w2w and single-image
  DreamBooth;
* **sampling**: intra-model ID consistency across seeds vs inter-model, and
  the distance of each sample to its nearest training model;
* **scaling**: inversion ID score and the mean ``|cos|`` between attribute
  directions against the number of models in the space;
* **zoo fidelity** and **the space is real** (issue 5): top-1 identification
  of zoo models' renders among 50 candidates, explained-variance curve.

Results go to ``results.json`` and an HTML report (:mod:`w2wkit.report`).

One job per module: :mod:`~w2wkit.evaluation.metrics` (ID score, pixel
RMSE), :mod:`~w2wkit.evaluation.evaluators` (the judges of pictures; pixel
evaluators), :mod:`~w2wkit.evaluation.stylise` (out-of-distribution inputs),
:mod:`~w2wkit.evaluation.worlds` (shipped and micro worlds),
:mod:`~w2wkit.evaluation.settings` (settings and profiles),
:mod:`~w2wkit.evaluation.edit_rules` and :mod:`~w2wkit.evaluation.calibration`
(how edits are made and how strong), :mod:`~w2wkit.evaluation.context` (what
the sections share), :mod:`~w2wkit.evaluation.sections` (one module per
section), :mod:`~w2wkit.evaluation.checks` (the targets),
:mod:`~w2wkit.evaluation.plots`, :mod:`~w2wkit.evaluation.progress` and
:mod:`~w2wkit.evaluation.runner` (:func:`run_eval`). The perfect edit
(:func:`edit_oracle`) and the judges' protocol live in
:mod:`w2wkit.world.oracle`, below, because the world build uses them too.

Worlds: the shipped miniature world (``w2wkit.world.shipped.load_world``)
or a *micro world* that :func:`build_micro_world` builds in seconds (a few
training steps; numbers from it only show that the machinery runs). Worlds
without trained evaluators get :class:`PixelEvaluators` (logistic regression
and Fisher discriminant on pixels, trained on procedural renders).

torch and diffusers are imported inside the functions that need them.
"""

from __future__ import annotations

from w2wkit.evaluation.calibration import pick_strength
from w2wkit.evaluation.context import EvalContext, fit_space
from w2wkit.evaluation.edit_rules import (
    correlated_attributes,
    edit_disentangled,
    excluded_by,
    plausible,
)
from w2wkit.evaluation.evaluators import Evaluators, PixelEvaluators, WorldEvaluators
from w2wkit.evaluation.metrics import (
    id_matrix,
    id_score,
    pixel_rmse,
    summarize,
    to_float01,
    to_uint8,
    unit,
)
from w2wkit.evaluation.progress import progress_bar
from w2wkit.evaluation.runner import SECTIONS, run_eval
from w2wkit.evaluation.settings import PROFILES, EvalSettings
from w2wkit.evaluation.stylise import STYLES, stylise
from w2wkit.evaluation.worlds import (
    EvalWorld,
    build_micro_world,
    load_eval_world,
    shipped_world_available,
)
from w2wkit.world.oracle import edit_oracle

__all__ = [
    "PROFILES",
    "SECTIONS",
    "STYLES",
    "EvalContext",
    "EvalSettings",
    "EvalWorld",
    "Evaluators",
    "PixelEvaluators",
    "WorldEvaluators",
    "build_micro_world",
    "correlated_attributes",
    "edit_disentangled",
    "edit_oracle",
    "excluded_by",
    "fit_space",
    "id_matrix",
    "id_score",
    "load_eval_world",
    "pick_strength",
    "pixel_rmse",
    "plausible",
    "progress_bar",
    "run_eval",
    "shipped_world_available",
    "stylise",
    "summarize",
    "to_float01",
    "to_uint8",
    "unit",
]
