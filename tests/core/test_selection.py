"""doconv.selection: the include / exclude rules every backend's convert shares."""

import re

import pytest

from doconv import selection


def test_glob_patterns_normalise_and_refuse_other_types():
    assert selection.glob_patterns(None, "include") is None
    pick = lambda name: True  # noqa: E731
    assert selection.glob_patterns(pick, "include") is pick
    assert selection.glob_patterns("layer1.*", "include") == ["layer1.*"]
    assert selection.glob_patterns((p for p in ["a", "b*"]), "exclude") == ["a", "b*"]  # a generator, read once
    for bad in (3, ["a", 3], b"x"):
        with pytest.raises(TypeError, match=r"exclude must be None, a glob pattern.*exclude=" + re.escape(repr(bad))):
            selection.glob_patterns(bad, "exclude")


def test_matches_and_unmatched():
    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
    assert [n for n in names if selection.matches(n, ["layer1.*"])] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert not selection.matches("Conv1", ["conv*"])  # case-sensitive on every platform
    assert selection.unmatched(["conv*", "haed", "fc"], names) == ["haed"]
    assert selection.unmatched(None, names) == [] and selection.unmatched(lambda n: True, names) == []
