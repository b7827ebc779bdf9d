"""Federated algorithms: each contributes a local loss and a server step, nothing else."""

from fedlit.algorithms.base import Algorithm, ServerStep, StepResult
from fedlit.algorithms.fedavg import AverageServer, FedAvg, WeightedSum, weighted_average

__all__ = [
    "Algorithm",
    "AverageServer",
    "FedAvg",
    "ServerStep",
    "StepResult",
    "WeightedSum",
    "weighted_average",
]
