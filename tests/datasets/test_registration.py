"""The built-in datasets register like any plugin: a factory(cfg, *, split) and a documented dataclass."""

import dataclasses
import importlib
import inspect

import mf_datasets

MINE = {"cifar": {"cifar10", "cifar100"}, "mnist": {"mnist", "fashion-mnist"}, "npz": {"npz"},
        "imagefolder": {"imagefolder"}}


def test_modules_are_listed_and_expose_components():
    for module_name, names in MINE.items():
        assert module_name in mf_datasets.MODULES
        components = importlib.import_module(f"mf_datasets.{module_name}").COMPONENTS
        assert set(components) == names
        for factory, config, help_text in components.values():
            assert dataclasses.is_dataclass(config) and help_text
            config()  # every field has a default
            params = inspect.signature(factory).parameters
            assert params["split"].kind is inspect.Parameter.KEYWORD_ONLY


def test_the_hook_registers_every_listed_module(monkeypatch):
    monkeypatch.setattr(mf_datasets, "MODULES", tuple(MINE))  # the 2-D toy sets are tested with their module
    registered = {}
    mf_datasets.register_datasets(lambda name, factory, config, help="": registered.setdefault(name, config))
    assert set(registered) == set().union(*MINE.values())
