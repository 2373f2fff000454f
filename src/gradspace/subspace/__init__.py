"""Gradient subspace (issue 4; low-dimensional gradient paper, Wu et al.): normalization
statistics of the energy gradient, PCA (block power iteration) and average-gradient
subspaces stored per parameter block, projection to reduced gradients, diagnostics and
the gradient-space detectors (``subspace.detectors``)."""
