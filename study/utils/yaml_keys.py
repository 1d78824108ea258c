"""YAML read safely, refusing a key given twice in one mapping.

The YAML spec requires unique keys, yet PyYAML keeps the last of two without a
word, so an edited config could silently lose the value its author meant.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "load_yaml"]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds a key twice; ``problem`` names the dotted key, both lines and the fix."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_document(self, node):
        _refuse_duplicates(node, "", set())
        return super().construct_document(node)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``; a duplicated key raises :class:`DuplicateKeyError`."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _refuse_duplicates(node: yaml.Node, where: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: checked where it was anchored (and no endless loop on a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, f"{where}[{i}]", seen)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[tuple[str, str], int] = {}
    for key, value in node.value:
        name = f"{where}.{key.value}" if where else str(key.value)
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":  # merge keys may repeat
            line = key.start_mark.line + 1
            if (key.tag, key.value) in lines:
                raise DuplicateKeyError(f"{name} is given twice (lines {lines[key.tag, key.value]} and {line}); "
                                        "keep one")
            lines[key.tag, key.value] = line
        _refuse_duplicates(value, name, seen)
