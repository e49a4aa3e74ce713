"""Lightning callbacks: plug distillation and pruning into any LightningModule holding STU layers."""

from spectralds.callbacks.distillation import STUToLDSDistillation
from spectralds.callbacks.pruning import LayerAdaptiveStatePruning
from spectralds.callbacks.report import StageReport

__all__ = ["LayerAdaptiveStatePruning", "STUToLDSDistillation", "StageReport"]
