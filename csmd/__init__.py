"""csmd: a local, real-time voice conversation daemon for Sesame CSM-1B on MLX."""

from csmd import _blas

# Must run before anything imports mlx.core; see _blas.py for why.
_blas.preload()
