"""fedlit: federated learning research on Lightning Fabric.

Clients run on Fabric ranks, the server's work is done by torch.distributed collectives, and
callbacks add freezing schedules, sparsity and probes. Start with `fedlit fit --config FILE`.
"""

__version__ = "0.1.0"
