"""Networks: StyleGAN2-ADA building blocks (NVlabs names and signatures) and the GMPI generator."""

from .discriminator import Discriminator
from .layers import Conv2dLayer, FullyConnectedLayer, MappingNetwork
from .synthesis import Generator, SynthesisNetwork

__all__ = ["Conv2dLayer", "Discriminator", "FullyConnectedLayer", "Generator", "MappingNetwork", "SynthesisNetwork"]
