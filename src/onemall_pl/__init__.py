"""OneMall as a PyTorch Lightning multi-stage pipeline."""

__version__ = "0.1.0"
