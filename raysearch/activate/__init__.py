"""Active Image Indexing: perturb images imperceptibly so that the index's quantiser represents them
better, and edited copies are found more often (Fernandez et al., ICLR 2023)."""
