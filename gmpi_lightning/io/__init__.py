"""Safe readers and writers for network files (NVlabs pickles, released GMPI checkpoints, our own)."""

from .stylegan2_pkl import NetworkFormatError, UnsafePickleError, load_stylegan2_pkl, save_converted

__all__ = ["NetworkFormatError", "UnsafePickleError", "load_stylegan2_pkl", "save_converted"]
