"""Methods: MagiCapture, MagicFace, MagicTailor and the baselines, each readable top to bottom,
over shared pieces (training loop, run folder, LoRA targets, sampling, exports)."""
