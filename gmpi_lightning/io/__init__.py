"""Safe readers and writers for network files (NVlabs pickles, released GMPI checkpoints, our own)."""

from .gmpi_ckpt import load_gmpi_checkpoint, load_official_gmpi, read_official_config, save_gmpi_checkpoint
from .stylegan2_pkl import NetworkFormatError, UnsafePickleError, load_stylegan2_pkl, save_converted

__all__ = ["NetworkFormatError", "UnsafePickleError", "load_gmpi_checkpoint", "load_official_gmpi",
           "load_stylegan2_pkl", "read_official_config", "save_converted", "save_gmpi_checkpoint"]
