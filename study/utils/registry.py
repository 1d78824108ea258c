"""The objective registry: names to classes. It sits below every other layer and imports no
objective, so that the config validates ``objective`` against :func:`names` without loading a model;
the built-in objectives are imported by name when first asked for."""

from __future__ import annotations

import importlib

__all__ = ["register", "objective_class", "names"]

BUILT_IN = {"ls": "study.methods.ls", "cimle": "study.methods.cimle", "mvae": "study.methods.mvae"}
_REGISTERED: dict[str, type] = {}


def register(name: str):
    """Class decorator: make ``cfg.objective = name`` build this objective."""

    def add(cls: type) -> type:
        if name in _REGISTERED and _REGISTERED[name] is not cls:
            raise ValueError(f"objective {name!r} is registered already (by {_REGISTERED[name].__module__})")
        cls.name = name
        _REGISTERED[name] = cls
        return cls

    return add


def objective_class(name: str) -> type:
    """The class registered for ``name`` (a :class:`study.methods.base.Objective`)."""
    if name not in _REGISTERED and name in BUILT_IN:
        importlib.import_module(BUILT_IN[name])
    if name not in _REGISTERED:
        raise ValueError(f"objective must be one of {names()}, got {name!r}")
    return _REGISTERED[name]


def names() -> list[str]:
    return sorted(set(BUILT_IN) | set(_REGISTERED))
