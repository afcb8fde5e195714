"""Rules over parameter paths, big_vision style: what to freeze, which LR multiplier, what to decay, what not to
load.

A parameter's path is its keys joined by "/", e.g. `backbone/stage4/block1/conv2/kernel` or `head/fc/bias`. A rule
list is an ordered sequence of `(regex, value)`; a parameter takes the value of the first rule whose regex matches
its whole path (`re.fullmatch`). A rule that matches no parameter (a typo, or one shadowed by earlier rules) is an
error, and so is a parameter that no rule matches unless the caller gives a default.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax

from jaxtl.core.errors import ConfigError

Rule = tuple[str, Any]
_NO_DEFAULT = object()


def path_of(key_path) -> str:
    """`backbone/stage1/block0/conv1/kernel` from a `jax.tree_util` key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def tree_paths(tree: Any) -> Any:
    """The tree with every leaf replaced by its path string."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: path_of(kp), tree)


def _compile(rules: Sequence[Rule], key: str) -> list[tuple[re.Pattern, Any, str]]:
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"{key}[{i}] = {rule!r}: each rule is a (regex, value) pair, e.g. ('head/.*', 1.0)")
        try:
            compiled.append((re.compile(rule[0]), rule[1], rule[0]))
        except re.error as e:
            raise ConfigError(f"{key}[{i}]: '{rule[0]}' is not a valid regex ({e})") from None
    return compiled


def match_rules(tree: Any, rules: Sequence[Rule], key: str, default: Any = _NO_DEFAULT) -> Any:
    """The tree with every leaf replaced by the value of the first rule matching its path.

    Errors name `key` (the config key the rules came from): a rule that matches no parameter, and, without a
    `default`, the parameters that no rule matches.
    """
    compiled = _compile(rules, key)
    used = [False] * len(compiled)
    unmatched = []

    def value(key_path, _):
        path = path_of(key_path)
        for i, (pattern, result, _) in enumerate(compiled):
            if pattern.fullmatch(path):
                used[i] = True
                return result
        unmatched.append(path)
        return default

    values = jax.tree_util.tree_map_with_path(value, tree)
    idle = [source for (_, _, source), hit in zip(compiled, used) if not hit]
    if idle:
        raise ConfigError(f"{key}: rule(s) {idle} match no parameter (earlier rules may take all they would); "
                          f"parameter paths look like {_examples(tree)}")
    if unmatched and default is _NO_DEFAULT:
        shown = ", ".join(unmatched[:5]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 5 else "")
        raise ConfigError(f"{key}: no rule matches {shown}; end the list with a catch-all such as ('.*', 0.0)")
    return values


def match_patterns(tree: Any, patterns: Sequence[str], key: str) -> Any:
    """A bool tree: True where the path matches one of `patterns`; a pattern that matches nothing is an error."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    return match_rules(tree, [(p, True) for p in patterns], key, default=False)


def _examples(tree: Any, count: int = 3) -> str:
    paths = jax.tree_util.tree_leaves(tree_paths(tree))
    return ", ".join(paths[:: max(len(paths) // count, 1)][:count])
