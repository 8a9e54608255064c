"""Judges of pictures: the evaluators' protocol and linear pixel evaluators.

:class:`Evaluators` (the protocol) and :class:`WorldEvaluators` (a world's
trained networks for one concept) live with the perfect edit in
:mod:`w2wkit.world.oracle`, which the world build uses too; they are
re-exported here. :class:`PixelEvaluators` serves worlds without trained
evaluators (micro worlds).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import FormatError
from w2wkit.evaluation.metrics import to_float01, to_uint8, unit
from w2wkit.world.oracle import Evaluators, WorldEvaluators

__all__ = ["Evaluators", "PixelEvaluators", "WorldEvaluators", "pixel_features"]


def pixel_features(images: np.ndarray, side: int = 16) -> np.ndarray:
    """Block-average pictures to ``side x side`` RGB and flatten.

    Parameters
    ----------
    images : numpy.ndarray
        ``(n, H, W, 3)`` uint8 or floats in ``[0, 1]``; sides that ``side`` does
        not divide are resized bilinearly instead.
    side : int

    Returns
    -------
    numpy.ndarray
        ``(n, 3 side^2)`` float32 in ``[0, 1]``.
    """
    x = to_float01(images).astype(np.float32)
    n, h, w = x.shape[:3]
    if h % side or w % side:
        from PIL import Image

        x = np.stack(
            [
                np.asarray(Image.fromarray(to_uint8(im)).resize((side, side), Image.BILINEAR))
                for im in x
            ]
        ).astype(np.float32)
        x /= 255.0
    else:
        x = x.reshape(n, side, h // side, side, w // side, 3).mean(axis=(2, 4))
    return x.reshape(n, -1)


@dataclass
class PixelEvaluators:
    """Linear evaluators on pixels, trained on procedural renders.

    Attribute classifier: one logistic regression per attribute on
    standardised ``16 x 16`` RGB pixels. Identity embedder: PCA then Fisher
    linear discriminant over identities ("Fisherfaces"), unit-normalised.
    Used for worlds that do not ship trained evaluators (micro worlds).

    Attributes
    ----------
    attributes : list of str
    feat_mean, feat_scale : numpy.ndarray
        ``(F,)`` standardisation of the features.
    attr_weight : numpy.ndarray
        ``(F, A)``; ``attr_bias`` ``(A,)``.
    id_mean : numpy.ndarray
        ``(F,)``; ``id_proj`` ``(F, D)``.
    metrics : dict
        Held-out accuracy per attribute and verification ROC-AUC.
    """

    attributes: list[str]
    feat_mean: np.ndarray
    feat_scale: np.ndarray
    attr_weight: np.ndarray
    attr_bias: np.ndarray
    id_mean: np.ndarray
    id_proj: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)
    name: str = "pixel evaluators (logistic regression + Fisherfaces on 16x16 pixels)"

    def _features(self, images: np.ndarray) -> np.ndarray:
        return (pixel_features(images) - self.feat_mean) / self.feat_scale

    def attribute_probs(self, images: np.ndarray) -> np.ndarray:
        """``(n, H, W, 3)`` -> ``(n, A)`` probabilities."""
        z = self._features(images) @ self.attr_weight + self.attr_bias
        return 1.0 / (1.0 + np.exp(-z))

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(n, H, W, 3)`` -> ``(n, D)`` unit identity embeddings."""
        return unit((self._features(images) - self.id_mean) @ self.id_proj)

    @classmethod
    def fit(
        cls,
        generator: Any,
        *,
        n_attr: int = 600,
        n_ids: int = 120,
        per_id: int = 6,
        seed: int = 0,
        size: int = 32,
    ) -> PixelEvaluators:
        """Train on renders of identities that no zoo or held-out model uses.

        Parameters
        ----------
        generator : ProceduralGenerator
        n_attr : int
            Identities (one picture each) for the attribute classifier; the
            last fifth is held out for the reported accuracy.
        n_ids, per_id : int
            Identities and pictures each for the identity embedder; a
            quarter of the identities is held out for the ROC-AUC.
        seed : int
            Population seed (use one not used by zoo/held-out identities).
        """
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score

        names = [a.name for a in generator.attributes]
        insts = generator.instances(n_attr, seed=seed)
        imgs = np.concatenate([generator.render(i, 1, seed=seed + 1, size=size) for i in insts])
        y = np.array([[float(i.attributes[a]) for a in names] for i in insts])
        feats = pixel_features(imgs)
        mu, sd = feats.mean(0), feats.std(0) + 1e-3
        X = (feats - mu) / sd
        n_tr = int(0.8 * len(X))
        W = np.zeros((X.shape[1], len(names)))
        b = np.zeros(len(names))
        acc = {}
        for j, a in enumerate(names):
            if len(np.unique(y[:n_tr, j])) < 2:
                b[j] = 10.0 if y[0, j] else -10.0
                acc[a] = float(np.mean(y[n_tr:, j] == y[0, j]))
                continue
            clf = LogisticRegression(C=0.05, max_iter=2000).fit(X[:n_tr], y[:n_tr, j])
            W[:, j], b[j] = clf.coef_[0], clf.intercept_[0]
            acc[a] = float(clf.score(X[n_tr:], y[n_tr:, j]))
        ids = generator.instances(n_ids, seed=seed + 2)
        id_imgs = np.concatenate(
            [generator.render(i, per_id, seed=seed + 3, size=size) for i in ids]
        )
        owner = np.repeat(np.arange(n_ids), per_id)
        Xi = (pixel_features(id_imgs) - mu) / sd
        n_fit = int(0.75 * n_ids) * per_id
        id_mean = Xi[:n_fit].mean(0)
        # PCA to at most 4x the discriminant size keeps LDA well conditioned
        n_pc = min(Xi.shape[1], n_fit - 1, 4 * int(0.75 * n_ids))
        _, _, vt = np.linalg.svd(Xi[:n_fit] - id_mean, full_matrices=False)
        pcs = vt[:n_pc].T
        lda = LinearDiscriminantAnalysis(solver="svd").fit(
            (Xi[:n_fit] - id_mean) @ pcs, owner[:n_fit]
        )
        proj = pcs @ lda.scalings_
        out = cls(names, mu, sd, W, b, id_mean, proj)
        # verification ROC-AUC on held-out identities
        emb = out.embed(id_imgs[n_fit:])
        own = owner[n_fit:]
        sims = emb @ emb.T
        iu = np.triu_indices(len(emb), 1)
        same = (own[:, None] == own[None, :])[iu]
        auc = float(roc_auc_score(same, sims[iu])) if same.any() and (~same).any() else float("nan")
        out.metrics = {"attribute_accuracy": acc, "verification_auc": auc}
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as ``.npz`` arrays plus a JSON string (no pickle)."""
        from w2wkit.stio import atomic_path

        with atomic_path(Path(path), overwrite=True, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    feat_mean=self.feat_mean,
                    feat_scale=self.feat_scale,
                    attr_weight=self.attr_weight,
                    attr_bias=self.attr_bias,
                    id_mean=self.id_mean,
                    id_proj=self.id_proj,
                    meta=np.array(
                        json.dumps({"attributes": self.attributes, "metrics": self.metrics})
                    ),
                )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PixelEvaluators:
        """Read what :meth:`save` wrote."""
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
            return cls(
                meta["attributes"],
                z["feat_mean"],
                z["feat_scale"],
                z["attr_weight"],
                z["attr_bias"],
                z["id_mean"],
                z["id_proj"],
                meta.get("metrics", {}),
            )
        except (OSError, KeyError, ValueError) as exc:
            raise FormatError(f"cannot read evaluators: {exc}", path=path) from None
