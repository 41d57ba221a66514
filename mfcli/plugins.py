"""Plugin discovery (pluggy + the ``mf`` entry-point group) and the component registry."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata as md
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from mfcli import hookspecs
from mfcli.errors import MFError

KINDS = ("objectives", "backbones", "datasets")
KIND_OF_SECTION = {"objective": "objectives", "backbone": "backbones", "data": "datasets"}


@dataclass
class Component:
    kind: str  # "objectives" | "backbones" | "datasets"
    name: str  # the name recipes use
    factory: Callable[..., Any]
    config: type  # a dataclass
    help: str
    plugin: str  # the registering plugin's entry-point name


@dataclass
class PluginInfo:
    name: str  # entry-point name
    module: str
    distribution: str
    version: str
    components: dict[str, list[str]] = field(default_factory=dict)


class Registry:
    """All components registered by all plugins, by kind and name."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        self.plugins: dict[str, PluginInfo] = {}

    def get(self, kind: str, name: str) -> Component:
        table = self.components[kind]
        if name not in table:
            singular = kind.rstrip("s")
            raise MFError(f"unknown {singular} '{name}'.{suggest(name, table)} Registered {kind}: {', '.join(sorted(table)) or 'none'}.")
        return table[name]

    def build(self, kind: str, name: str, cfg: Any, **context: Any) -> Any:
        return self.get(kind, name).factory(cfg, **context)

    # -- registration ---------------------------------------------------------------------------
    def _registrar(self, kind: str, plugin: str) -> Callable[..., None]:
        def register(name: str, factory: Callable[..., Any], config: type, help: str = "") -> None:
            if not isinstance(name, str) or not name:
                raise MFError(f"plugin '{plugin}' registered a {kind[:-1]} without a name.")
            if not dataclasses.is_dataclass(config):
                raise MFError(f"plugin '{plugin}' registered {kind[:-1]} '{name}' with a config that is not a dataclass.")
            if name in self.components[kind]:
                other = self.components[kind][name].plugin
                raise MFError(f"duplicate {kind[:-1]} name '{name}': registered by plugin '{other}' and again by plugin '{plugin}'. Uninstall one of them or rename the component.")
            self.components[kind][name] = Component(kind, name, factory, config, help, plugin)
            self.plugins[plugin].components.setdefault(kind, []).append(name)

        return register


def register_modules(package: str, modules, register) -> None:
    """Register the ``COMPONENTS = {name: (factory, Config, help)}`` of each ``package.module``.

    A convenience for plugins that keep one component family per module (the built-ins do);
    a plugin may just as well call ``register`` itself.
    """
    import importlib

    for module_name in modules:
        module = importlib.import_module(f"{package}.{module_name}")
        for name, (factory, config, help_text) in module.COMPONENTS.items():
            register(name, factory, config, help=help_text)


def suggest(name: str, choices) -> str:
    """' Did you mean 'x'?' or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _entry_points():
    return sorted(md.entry_points(group="mf"), key=lambda ep: (ep.name != "objectives", ep.name != "backbones", ep.name != "datasets", ep.name))


def load_registry(extra_plugins: dict[str, object] | None = None) -> Registry:
    """Discover every plugin in the ``mf`` entry-point group and collect its components.

    ``extra_plugins`` (name -> module or object) lets tests register plugins without installing them.
    """
    pm = pluggy.PluginManager("mf")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    found: list[tuple[str, object, str, str, str]] = []
    for ep in _entry_points():
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party plugin must not look like an mf bug
            dist = ep.dist.name if ep.dist else "?"
            raise MFError(f"plugin '{ep.name}' (from distribution '{dist}', module '{ep.value}') failed to import: {type(exc).__name__}: {exc}") from exc
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else getattr(obj, "__version__", "?")
        found.append((ep.name, obj, ep.value, dist, version))
    for name, obj in (extra_plugins or {}).items():
        found.append((name, obj, getattr(obj, "__name__", repr(obj)), "(not installed)", getattr(obj, "__version__", "?")))

    for name, obj, module, dist, version in found:
        if pm.is_registered(obj) or name in registry.plugins:
            continue
        try:
            pm.register(obj, name=name)
        except pluggy.PluginValidationError as exc:
            raise MFError(f"plugin '{name}' (module '{module}') does not fit the mf plugin contract: {exc}") from exc
        registry.plugins[name] = PluginInfo(name, module, dist, version)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        plugin = pm.get_name(exc.plugin) if getattr(exc, "plugin", None) is not None else "?"
        valid = [n for n in dir(hookspecs) if n.startswith("register_")]
        bad = str(exc).split("'")[1] if "'" in str(exc) else str(exc)
        raise MFError(f"plugin '{plugin}' implements an unknown hook '{bad}'.{suggest(bad, valid)} Valid hooks: {', '.join(valid)}.") from exc

    for kind in KINDS:
        hook = getattr(pm.hook, f"register_{kind}")
        for impl in hook.get_hookimpls():
            try:
                impl.function(registry._registrar(kind, impl.plugin_name))
            except MFError:
                raise
            except Exception as exc:
                raise MFError(f"plugin '{impl.plugin_name}' failed while registering its {kind}: {type(exc).__name__}: {exc}") from exc
    return registry


_REGISTRY: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY
