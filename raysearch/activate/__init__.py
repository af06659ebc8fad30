"""Active Image Indexing: perturb images imperceptibly so that the index's quantiser represents them
better, and edited copies are found more often (Fernandez et al., ICLR 2023)."""

# Full-resolution pixels dominate an activation's memory: the image, its JND heatmap, the perturbation
# variable, its gradient and Adam's two moments, the perturbed image and the resize's buffers (about
# 160 bytes per pixel on the CPU, measured: benchmarks/activate_memory.py). Images are therefore
# optimised in groups of at most this many pixels. Defined here so the CLI can name it without
# importing torch.
DEFAULT_BATCH_PIXELS = 16_000_000
