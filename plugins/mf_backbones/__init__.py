"""Built-in backbones of mf, registered through the `mf` entry-point group like any third-party plugin.

Each module listed in ``MODULES`` exposes ``COMPONENTS = {name: (factory, ConfigDataclass, help)}``.
"""

import importlib

from mfcli import hookimpl

__version__ = "0.1.0"

MODULES: tuple[str, ...] = ("mlp", "dit", "dit_incontext", "unet", "resnet")


@hookimpl
def register_backbones(register):
    for module_name in MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        for name, (factory, config, help_text) in module.COMPONENTS.items():
            register(name, factory, config, help=help_text)
