"""Federated algorithms: each contributes a local loss and a server step, nothing else."""

from fedlit.algorithms.base import Algorithm, RoundSums, ServerStep, StepResult, Upload
from fedlit.algorithms.fedavg import AverageServer, FedAvg, WeightedSum, weighted_average
from fedlit.algorithms.feddyn import FedDyn
from fedlit.algorithms.fedmr import FedMR
from fedlit.algorithms.fednova import FedNova
from fedlit.algorithms.fedprox import FedProx
from fedlit.algorithms.moon import MOON
from fedlit.algorithms.scaffold import SCAFFOLD

__all__ = [
    "Algorithm",
    "AverageServer",
    "FedAvg",
    "FedDyn",
    "FedMR",
    "FedNova",
    "FedProx",
    "MOON",
    "RoundSums",
    "SCAFFOLD",
    "ServerStep",
    "StepResult",
    "Upload",
    "WeightedSum",
    "weighted_average",
]
