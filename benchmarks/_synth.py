"""Synthetic data for the PCA benchmarks: power-law spectrum plus a noise floor.

``Z = U diag(s) V^T + E`` with ``s_j = j^-alpha`` (j <= r) and iid noise ``E``
whose largest singular value equals ``noise_edge * s_k``, so the spectrum is a
power law that flattens into a noisy tail around component ``k`` (the hard
case for randomized solvers). ``U``, ``V`` are Gaussian with orthonormal-ish
columns. Rows are generated block by block from ``(seed, block index)``, so the
same matrix comes out whatever the writer's block size.
"""

from __future__ import annotations

import numpy as np

GEN_BLOCK = 1024


class PowerLawData:
    """Row-block generator of a synthetic float32 matrix (N, d).

    Parameters
    ----------
    n, d, k : int
        Shape and the component around which the noise floor sits.
    alpha : float
        Power-law exponent of the signal singular values.
    rank_factor : float
        Signal rank ``r = rank_factor * k``.
    noise_edge : float
        Largest noise singular value as a multiple of ``s_k``.
    seed : int
        Seed.
    """

    def __init__(
        self,
        n: int,
        d: int,
        k: int,
        *,
        alpha: float = 0.5,
        rank_factor: float = 1.5,
        noise_edge: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.n, self.d, self.k, self.seed = n, d, k, seed
        self.r = r = min(int(rank_factor * k), n, d)
        rng = np.random.default_rng([seed, 0])
        self.s = (np.arange(1, r + 1, dtype=np.float64) ** -alpha).astype(np.float32)
        # V^T (r, d), rows ~ unit norm; U rows drawn per block, columns ~ unit norm
        self.vt = rng.standard_normal((r, d), dtype=np.float32)
        self.vt *= np.float32(1.0 / np.sqrt(d))
        s_k = float(self.s[min(k, r) - 1])
        self.eps = np.float32(noise_edge * s_k / (np.sqrt(n) + np.sqrt(d)))

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` (must be aligned to GEN_BLOCK, except the last)."""
        out = []
        for b in range(lo // GEN_BLOCK, (hi + GEN_BLOCK - 1) // GEN_BLOCK):
            out.append(self.block(b))
        z = np.concatenate(out) if len(out) > 1 else out[0]
        first = (lo // GEN_BLOCK) * GEN_BLOCK
        return z[lo - first : hi - first]

    def block(self, b: int) -> np.ndarray:
        """Generation block ``b`` (GEN_BLOCK rows, fewer at the end)."""
        lo = b * GEN_BLOCK
        m = min(GEN_BLOCK, self.n - lo)
        rng = np.random.default_rng([self.seed, 1, b])
        u = rng.standard_normal((m, self.r), dtype=np.float32)
        u *= self.s * np.float32(1.0 / np.sqrt(self.n))
        z = u @ self.vt
        # uniform noise with variance eps^2 (same spectrum law as Gaussian, cheaper)
        noise = rng.random((m, self.d), dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= np.float32(self.eps * np.sqrt(12.0))
        z += noise
        return z

    def n_blocks(self) -> int:
        return (self.n + GEN_BLOCK - 1) // GEN_BLOCK
