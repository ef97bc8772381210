"""Evaluation of personalised generations: CSIM, Style, Aesthetic (MagiCapture's Table 1) and CLIP-T, CLIP-I,
DINO, Face-sim, DreamSim. ``evaluate_images`` computes them, ``write_report`` writes report.json + report.md."""

from .metrics import (DEFAULT_METRICS, METRICS, clean_prompt, clear_model_cache, evaluate_images, load_prompts,
                      parse_metrics)
from .report import summarise, write_new_report, write_report

__all__ = ["DEFAULT_METRICS", "METRICS", "clean_prompt", "clear_model_cache", "evaluate_images", "load_prompts",
           "parse_metrics", "summarise", "write_new_report", "write_report"]
