"""Built-in datasets of mf, registered through the `mf` entry-point group like any third-party plugin.

Each module listed in ``MODULES`` exposes ``COMPONENTS = {name: (factory, ConfigDataclass, help)}``.
"""

from mfcli import hookimpl
from mfcli.plugins import register_modules

__version__ = "0.1.0"

MODULES: tuple[str, ...] = ("toy", "cifar", "mnist", "npz", "imagefolder", "latents")


@hookimpl
def register_datasets(register):
    register_modules(__name__, MODULES, register)
