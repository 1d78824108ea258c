"""Pretraining objectives, one module each, behind a registry; the pretraining model
(:mod:`study.methods.model`) and the loop call only the interface in :mod:`study.methods.base`.
Another objective is added by decorating its class with :func:`register` (``tests/test_methods.py``).
"""

from study.utils.registry import names, objective_class, register

__all__ = ["register", "objective_class", "names"]
