"""spectralds: train spectral state-space models and distill them into fast LDS layers."""

__version__ = "0.1.0"
