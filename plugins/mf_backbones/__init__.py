"""Built-in backbones of mf, registered through the `mf` entry-point group like any third-party plugin.

Each module listed in ``MODULES`` exposes ``COMPONENTS = {name: (factory, ConfigDataclass, help)}``.
"""

from mfcli import hookimpl
from mfcli.plugins import register_modules

__version__ = "0.1.0"

MODULES: tuple[str, ...] = ("mlp", "dit", "dit_incontext", "unet", "resnet")


@hookimpl
def register_backbones(register):
    register_modules(__name__, MODULES, register)
