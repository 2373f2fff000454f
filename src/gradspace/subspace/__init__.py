"""Gradient subspace (issue 4; low-dimensional gradient paper, Wu et al.): normalization
statistics of the energy gradient, PCA (block power iteration) and average-gradient
subspaces stored per parameter block, projection to reduced gradients and diagnostics.
The detectors on reduced gradients live with the other detectors
(``gradspace.detectors.gradient``)."""
