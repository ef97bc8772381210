"""Attention processors: differentiable map capture (MagiCapture, MagicTailor), MagicFace RSA/RBA."""

from .capture import AttentionStore, CaptureProcessor, install_capture, select_layers

__all__ = ["AttentionStore", "CaptureProcessor", "install_capture", "select_layers"]
