"""csmd: a local, real-time voice conversation daemon for Sesame CSM-1B on MLX."""

from importlib.metadata import PackageNotFoundError, version

from csmd import _blas

try:
    __version__ = version("csmd")  # from the installed package's metadata: one version, set in pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

# Must run before anything imports mlx.core; see _blas.py for why.
_blas.preload()
