"""FedProx's Synthetic(alpha, beta) data: one logistic-regression task per device.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Section 5.1, and the
generator in their repository (data/synthetic_*/generate_synthetic.py). For device k:

    u_k ~ N(0, alpha), W_k[i, j] ~ N(u_k, 1), b_k[j] ~ N(u_k, 1)   (model heterogeneity)
    B_k ~ N(0, beta),  v_k[i] ~ N(B_k, 1)                          (data heterogeneity)
    x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2        (j = 1..dim)
    y = argmax(softmax(W_k^T x + b_k)) = argmax(W_k^T x + b_k)
    n_k = floor(LogNormal(4, 2)) + min_samples                     (power-law device sizes)

As in their code, alpha and beta are used as standard deviations (numpy's `scale`); the paper
writes N(0, alpha), which is the same for the usual settings (0, 0.5, 1). Each device's samples
are shuffled and split 80% train / 20% test, as the paper states (their script uses 90/10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Log-normal parameters of the per-device sample counts in FedProx's generator.
LOGNORMAL_MEAN = 4.0
LOGNORMAL_SIGMA = 2.0
TRAIN_FRACTION = 0.8


@dataclass
class SyntheticData:
    train_x: torch.Tensor  # float32 (N, dim)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    natural_train: list[np.ndarray]  # per-device indices into train_x
    natural_test: list[np.ndarray]


def generate_synthetic(
    num_devices: int,
    alpha: float,
    beta: float,
    dim: int = 60,
    num_classes: int = 10,
    min_samples: int = 50,
    seed: int = 0,
) -> SyntheticData:
    """Synthetic(alpha, beta) with `num_devices` devices, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(LOGNORMAL_MEAN, LOGNORMAL_SIGMA, num_devices).astype(np.int64)
    counts += min_samples
    model_means = rng.normal(0.0, alpha, num_devices)
    data_means = rng.normal(0.0, beta, num_devices)
    cov_diag = np.arange(1, dim + 1, dtype=np.float64) ** -1.2
    train_x, train_y, test_x, test_y = [], [], [], []
    natural_train, natural_test = [], []
    n_train = n_test = 0
    for k in range(num_devices):
        w = rng.normal(model_means[k], 1.0, (dim, num_classes))
        b = rng.normal(model_means[k], 1.0, num_classes)
        v = rng.normal(data_means[k], 1.0, dim)
        # Sigma is diagonal, so x = v + sqrt(diag) * z draws N(v, Sigma) exactly.
        x = v + np.sqrt(cov_diag) * rng.standard_normal((counts[k], dim))
        y = np.argmax(x @ w + b, axis=1)
        order = rng.permutation(counts[k])
        x, y = x[order], y[order]
        cut = int(TRAIN_FRACTION * counts[k])
        train_x.append(x[:cut])
        train_y.append(y[:cut])
        test_x.append(x[cut:])
        test_y.append(y[cut:])
        natural_train.append(np.arange(n_train, n_train + cut, dtype=np.int64))
        natural_test.append(np.arange(n_test, n_test + counts[k] - cut, dtype=np.int64))
        n_train += cut
        n_test += counts[k] - cut
    return SyntheticData(
        train_x=torch.from_numpy(np.concatenate(train_x)).float(),
        train_y=torch.from_numpy(np.concatenate(train_y)).long(),
        test_x=torch.from_numpy(np.concatenate(test_x)).float(),
        test_y=torch.from_numpy(np.concatenate(test_y)).long(),
        natural_train=natural_train,
        natural_test=natural_test,
    )
