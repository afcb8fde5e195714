"""Rules over parameter paths: first match wins, whole-path matches, and every mistake is an error naming the key."""

import pytest

from jaxtl.core.errors import ConfigError
from jaxtl.rules import match_patterns, match_rules, tree_paths

PARAMS = {"backbone": {"stem": {"conv": {"kernel": 1}, "bn": {"scale": 2, "bias": 3}},
                       "stage1": {"block0": {"conv1": {"kernel": 4}}}},
          "head": {"fc": {"kernel": 5, "bias": 6}}}


def test_paths_are_keys_joined_by_slashes():
    assert tree_paths(PARAMS)["backbone"]["stage1"]["block0"]["conv1"]["kernel"] == "backbone/stage1/block0/conv1/kernel"


def test_first_matching_rule_wins_and_matches_the_whole_path():
    values = match_rules(PARAMS, [("head/.*", 1.0), (".*/bn/.*", 0.5), ("backbone/stage1/.*", 0.1), (".*", 0.0)], "r")
    assert values["head"]["fc"] == {"kernel": 1.0, "bias": 1.0}
    assert values["backbone"]["stem"]["bn"] == {"scale": 0.5, "bias": 0.5}
    assert values["backbone"]["stage1"]["block0"]["conv1"]["kernel"] == 0.1
    assert values["backbone"]["stem"]["conv"]["kernel"] == 0.0
    # "stem" alone is not a whole path: fullmatch, not search
    with pytest.raises(ConfigError, match=r"r: rule\(s\) \['stem'\] match no parameter"):
        match_rules(PARAMS, [("stem", 1.0), (".*", 0.0)], "r")


@pytest.mark.parametrize("rules,match", [
    ([("head/.*", 1.0)], r"transfer.rules: no rule matches backbone/stage1/block0/conv1/kernel, .*catch-all"),
    ([(".*", 1.0), ("head/.*", 0.0)], r"transfer.rules: rule\(s\) \['head/\.\*'\] match no parameter"),
    ([("head/(", 1.0)], r"transfer.rules\[0\]: 'head/\(' is not a valid regex"),
    ([("head/.*",)], r"transfer.rules\[0\] = \('head/\.\*',\): each rule is a \(regex, value\) pair"),
])
def test_mistakes_are_errors_naming_the_key(rules, match):
    with pytest.raises(ConfigError, match=match):
        match_rules(PARAMS, rules, "transfer.rules")


def test_patterns_with_a_default():
    mask = match_patterns(PARAMS, ("backbone/stem/.*",), "model.reinit")
    assert mask["backbone"]["stem"]["bn"]["scale"] and not mask["head"]["fc"]["kernel"]
