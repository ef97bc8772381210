"""magicstudio: personalised studio portraits with Stable Diffusion.

Layers (lower never imports higher): data -> models -> attention -> losses -> methods -> cli/ui.
"""

__version__ = "0.1.0"
