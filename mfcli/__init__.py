"""mf: train, sample, evaluate and compress one-step generative models of the MeanFlow family."""

from mfcli.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
