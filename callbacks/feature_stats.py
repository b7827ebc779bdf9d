"""Class-structure statistics of features, accumulated in chunks (pure functions, no model).

The layer-peeled probe (callbacks/probes.py) streams a client's samples through a model and
feeds each batch's features here. Only per-class sums, counts and the sum of squared norms are
kept, in float64, so the features of all samples are never held at once and the statistics are
exact whatever the chunking:

    Var_W = (1/N) sum_c sum_i ||h_ci - mu_c||^2 = (1/N) (sum_i ||h_i||^2 - sum_c n_c ||mu_c||^2)
    Var_B = (1/C') sum_c ||mu_c - mu_G||^2      over the C' classes present, mu_G = (1/N) sum_i h_i

Everything that needs class means (Var_B, the ratio, both alignments) is undefined when fewer
than two classes are present; those functions return NaN and the probe leaves such a client out
of that metric's average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ClassMoments:
    """Running per-class sums of one layer's features on one client's samples."""

    counts: Tensor  # (C,) float64
    sums: Tensor  # (C, d) float64
    squared_norms: Tensor  # () float64: sum_i ||h_i||^2
    gram: Tensor | None = None  # (d+1, d+1) float64: sum_i [h_i, 1] [h_i, 1]^T, for read-outs

    @classmethod
    def zeros(
        cls,
        num_classes: int,
        dim: int,
        device: torch.device | str = "cpu",
        with_gram: bool = False,
    ) -> ClassMoments:
        f64 = torch.float64
        return cls(
            counts=torch.zeros(num_classes, dtype=f64, device=device),
            sums=torch.zeros(num_classes, dim, dtype=f64, device=device),
            squared_norms=torch.zeros((), dtype=f64, device=device),
            gram=torch.zeros(dim + 1, dim + 1, dtype=f64, device=device) if with_gram else None,
        )

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add one chunk: `features` (n, d), `labels` (n,) class ids."""
        h = features.detach().to(torch.float64)
        labels = labels.to(h.device)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.sums.index_add_(0, labels, h)
        self.squared_norms += (h * h).sum()
        if self.gram is not None:
            augmented = with_bias(h)
            self.gram += augmented.T @ augmented

    @property
    def present(self) -> Tensor:
        """Mask of the classes with at least one sample."""
        return self.counts > 0

    def centred_means(self) -> Tensor:
        """mu_c - mu_G for the classes present, (C', d)."""
        present = self.present
        counts = self.counts[present]
        sums = self.sums[present]
        global_mean = sums.sum(0) / counts.sum()
        return sums / counts[:, None] - global_mean


def with_bias(h: Tensor) -> Tensor:
    """[h, 1]: features with a constant column, so read-outs get a bias."""
    return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)


def fit_readout(m: ClassMoments, ridge: float) -> Tensor:
    """Ridge least-squares read-out from features (with bias) to one-hot labels, (d+1, C).

    Closed form from the accumulated sums, no second pass: with Z = [H, 1] and one-hot Y,
    Z^T Z is the Gram matrix and Z^T Y = [class sums^T; counts]. The penalty is `ridge` times
    the mean diagonal of Z^T Z, so it does not depend on the features' scale.
    """
    if m.gram is None:
        raise ValueError("fit_readout needs moments accumulated with with_gram=True")
    targets = torch.cat([m.sums.T, m.counts[None, :]], dim=0)
    size = m.gram.shape[0]
    penalty = ridge * float(m.gram.diagonal().mean())
    eye = torch.eye(size, dtype=m.gram.dtype, device=m.gram.device)
    return torch.linalg.solve(m.gram + penalty * eye, targets)


def readout_correct(readout: Tensor, features: Tensor, labels: Tensor) -> Tensor:
    """How many of a chunk's samples the read-out classifies correctly (a device scalar)."""
    scores = with_bias(features.detach().to(torch.float64)) @ readout
    return (scores.argmax(1) == labels.to(scores.device)).sum()


def within_class_variance(m: ClassMoments) -> float:
    """Var_W from the sums; clamped at 0 against rounding when the classes are collapsed."""
    present = m.present
    total = float(m.counts.sum())
    if total == 0:
        return math.nan
    mean_terms = ((m.sums[present] ** 2).sum(1) / m.counts[present]).sum()
    return max(0.0, float(m.squared_norms - mean_terms) / total)


def between_class_variance(m: ClassMoments) -> float:
    """Var_B over the classes present (NaN with fewer than two)."""
    if int(m.present.sum()) < 2:
        return math.nan
    return float((m.centred_means() ** 2).sum(1).mean())


def variance_ratio(var_w: float, var_b: float) -> float:
    """Var_W / Var_B: lower means better separated classes (NaN when Var_B is 0 or NaN)."""
    if not var_b > 0:
        return math.nan
    return var_w / var_b


def classifier_cosine(m: ClassMoments, weight: Tensor) -> float:
    """Mean over the classes present of cos(mu_c - mu_G, w_c), `weight` the (C, d) classifier.

    1 when each class's mean direction points along its own classifier row (neural collapse's
    self-duality); the rows are taken as they are (not centred), biases are ignored.
    """
    if int(m.present.sum()) < 2:
        return math.nan
    rows = weight.detach().to(torch.float64)[m.present.to(weight.device)]
    cos = torch.nn.functional.cosine_similarity(m.centred_means(), rows.to(m.sums.device), dim=1)
    return float(cos.mean())


def effective_weight(weight: Tensor, dim: int) -> Tensor | None:
    """The next layer's weight as a linear map on `dim`-d pooled features, (out, dim); None when
    that layer does not read features of this width.

    A conv (out, dim, k, k) applied to a spatially constant map equal to the pooled vector
    h gives (sum over its kernel) @ h away from the borders; a linear layer reading a flattened
    (dim, H, W) map gives the same with its columns summed over each channel's H*W positions
    (channel-major flattening); a linear layer reading exactly `dim` inputs is used as it is.
    """
    w = weight.detach().to(torch.float64)
    out = w.shape[0]
    if w.dim() >= 3:
        return w.flatten(2).sum(2) if w.shape[1] == dim else None
    if w.dim() == 2 and w.shape[1] % dim == 0:
        return w.reshape(out, dim, w.shape[1] // dim).sum(2)
    return None


def alignment_gain(m: ClassMoments, weight: Tensor) -> float:
    """How strongly the next layer responds to this layer's class structure.

        A = [ sum_c ||W (mu_c - mu_G)||^2 / sum_c ||mu_c - mu_G||^2 ] / [ ||W||_F^2 / d ]

    with W the (out, d) effective weight of the next layer. The numerator is the gain of W along
    the class-mean directions, the denominator its average gain over all directions (the mean of
    its squared singular values spread over d dimensions), so A = 1 for a layer blind to the
    class structure, A > 1 when the class directions lie along its dominant singular
    directions. Scale-free in W and in the features.
    """
    if int(m.present.sum()) < 2:
        return math.nan
    w = weight.to(device=m.sums.device, dtype=torch.float64)
    deltas = m.centred_means()
    spread = float((deltas**2).sum())
    average_gain = float((w**2).sum()) / w.shape[1]
    if spread == 0 or average_gain == 0:
        return math.nan
    return float(((deltas @ w.T) ** 2).sum()) / spread / average_gain


def relative_change(local: float, global_: float) -> float:
    """(global - local) / |local|; NaN when local is 0 or either value is NaN."""
    if not math.isfinite(local) or not math.isfinite(global_) or local == 0:
        return math.nan
    return (global_ - local) / abs(local)


def layer_metrics(
    m: ClassMoments, next_weight: Tensor | None, classifier: Tensor | None
) -> dict[str, float]:
    """All per-layer numbers of one client on one model: var_w, var_b, ratio, and align when the
    next layer reads this width, cls_cos when `classifier` is given (penultimate layer)."""
    var_w = within_class_variance(m)
    var_b = between_class_variance(m)
    values = {"var_w": var_w, "var_b": var_b, "ratio": variance_ratio(var_w, var_b)}
    if next_weight is not None:
        values["align"] = alignment_gain(m, next_weight)
    if classifier is not None:
        values["cls_cos"] = classifier_cosine(m, classifier)
    return values
