"""The recommendation pipeline: candidates from the snapshot, popular fallbacks, compiled kernels."""
