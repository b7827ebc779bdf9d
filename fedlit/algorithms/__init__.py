"""Federated algorithms: each contributes a local loss and a server step, nothing else."""

from fedlit.algorithms.base import Algorithm, ServerStep, StepResult
from fedlit.algorithms.fedavg import AverageServer, FedAvg, WeightedSum, weighted_average
from fedlit.algorithms.fedmr import FedMR
from fedlit.algorithms.fedprox import FedProx
from fedlit.algorithms.moon import MOON

__all__ = [
    "Algorithm",
    "AverageServer",
    "FedAvg",
    "FedMR",
    "FedProx",
    "MOON",
    "ServerStep",
    "StepResult",
    "WeightedSum",
    "weighted_average",
]
