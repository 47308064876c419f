"""Pipeline parallelism applied from outside the single-device model: topology, partition, schedule.

torchrun --nproc-per-node 2 -m lorafleet train CONFIG.yaml     # or: lorafleet train CONFIG.yaml --nproc 2
"""

from .coordinator import PipelineTrainer
from .partition import StageCosts, balance, edges_from_boundaries, estimate_costs, stage_cost
from .pipeline import PipelineError, PipelineResult, run_pipeline, trace_summary
from .topology import Links, Topology

__all__ = [
    "Links",
    "PipelineError",
    "PipelineResult",
    "PipelineTrainer",
    "StageCosts",
    "Topology",
    "balance",
    "edges_from_boundaries",
    "estimate_costs",
    "run_pipeline",
    "stage_cost",
    "trace_summary",
]
