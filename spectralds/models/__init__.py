"""LightningModules built from the layer registry."""

from spectralds.models.classification import SequenceClassifier
from spectralds.models.lm import LanguageModel
from spectralds.models.regression import SequenceRegression
from spectralds.models.schedules import WarmupCosineLR

__all__ = ["LanguageModel", "SequenceClassifier", "SequenceRegression", "WarmupCosineLR"]
