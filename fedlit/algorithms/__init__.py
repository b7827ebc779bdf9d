"""Federated algorithms: each contributes a local loss and a server step, nothing else."""

from fedlit.algorithms.base import Algorithm
from fedlit.algorithms.fedavg import FedAvg, WeightedSum, weighted_average

__all__ = ["Algorithm", "FedAvg", "WeightedSum", "weighted_average"]
