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


def test_selects_and_refuse_unmatched():
    assert selection.selects(["layer1.*"], "layer1.0") and not selection.selects(None, "layer1.0")
    assert selection.selects(lambda name, block: block == "conv" and name == "a", "a", "conv")
    assert not selection.selects(lambda name, block: False, "a", "conv")
    selection.refuse_unmatched({"include": ["a*"], "exclude": None}, ["a", "b"], "block path")  # all matched
    with pytest.raises(ValueError, match=r"^include pattern\(s\) \['x'\] match no block path of the model; "
                                         r"exclude pattern\(s\) \['y\*'\] match no block path.*look like 'a', 'b'$"):
        selection.refuse_unmatched({"include": ["a", "x"], "exclude": ["y*"]}, ["a", "b"], "block path")
    with pytest.raises(ValueError, match=r"layer names look like 'conv1'$"):
        selection.refuse_unmatched({"exclude": ["haed"]}, ["conv1", "relu"], "layer name", ["conv1"])
