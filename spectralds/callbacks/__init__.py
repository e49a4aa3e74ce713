"""Lightning callbacks: plug distillation and pruning into any LightningModule holding STU layers;
stage reports and token throughput for any run."""

from spectralds.callbacks.distillation import STUToLDSDistillation
from spectralds.callbacks.pruning import LayerAdaptiveStatePruning
from spectralds.callbacks.report import StageReport
from spectralds.callbacks.throughput import TokenThroughput

__all__ = ["LayerAdaptiveStatePruning", "STUToLDSDistillation", "StageReport", "TokenThroughput"]
