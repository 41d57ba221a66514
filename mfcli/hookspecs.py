"""The plugin contract of mf (pluggy project name ``"mf"``).

A plugin is an importable module or package exposed through the ``mf`` entry-point
group. It implements any of the hooks below with the ``mfcli.hookimpl`` marker.
Each hook receives a ``register(name, factory, config, help="")`` callable:

* ``name``    -- the name a recipe uses (``[objective] name = "mf"``).
* ``factory`` -- ``factory(cfg, **context)`` builds the component (see each hook).
* ``config``  -- a dataclass with defaults; recipe keys are validated against it.
* ``help``    -- one line for ``mf plugins``.

The built-in plugins (``mf_objectives``, ``mf_backbones``, ``mf_datasets``) are
registered exactly like third-party ones.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mf")
hookimpl = pluggy.HookimplMarker("mf")


@hookspec
def register_objectives(register):
    """Register objectives: ``factory(cfg, *, num_classes) -> Objective`` (see ``mfcli.api``)."""


@hookspec
def register_backbones(register):
    """Register backbones: ``factory(cfg, *, shape, num_classes) -> nn.Module`` with ``forward(z, t, h, cond=None)``."""


@hookspec
def register_datasets(register):
    """Register datasets: ``factory(cfg, *, split) -> Dataset`` with ``shape`` and ``num_classes``."""
