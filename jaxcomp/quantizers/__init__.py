"""Post-training quantization solvers: ``<method>.py`` registers the method
(`jaxcomp.oneshot.registry`), ``<method>_core.py`` holds its math on plain arrays (no Flax)."""
