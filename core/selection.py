"""Which layers ``convert`` touches: ``include`` / ``exclude`` as glob patterns over layer names.

Every backend's ``convert`` takes the same selectors -- None, a glob pattern (``fnmatch`` rules,
``'layer1.*'``), a collection of them, or a callable -- and refuses a pattern that matches no name of
the model: a typo must not silently convert the layer it meant to leave alone.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, List, Mapping, Optional, Sequence


def glob_patterns(selector, argument: str, callable_form: str = "a callable"):
    """``selector`` as given when None or callable, else its patterns as a list of str (TypeError naming
    ``argument`` otherwise). A generator is read once, here."""
    if selector is None or callable(selector):
        return selector
    patterns = [selector] if isinstance(selector, str) else selector
    try:
        patterns = list(patterns)
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{argument} must be None, a glob pattern, a collection of patterns or {callable_form}, "
                        f"but got {argument}={selector!r}")
    return patterns


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches one of ``patterns`` (case-sensitive ``fnmatch``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def selects(selector, name: str, *context) -> bool:
    """Whether ``selector`` (from :func:`glob_patterns`) picks ``name``; a callable is asked
    ``selector(name, *context)`` (e.g. the module or block at that path); None picks nothing."""
    if selector is None:
        return False
    return bool(selector(name, *context)) if callable(selector) else matches(name, selector)


def refuse_unmatched(selectors: Mapping[str, object], names: Iterable[str], noun: str,
                     examples: Optional[Sequence[str]] = None) -> None:
    """ValueError naming, per argument (``{'include': patterns, ...}``), the patterns that match none of
    ``names`` (the model's names, of kind ``noun``), with a few ``examples`` (default: the first names)."""
    names = list(names)
    missed = {argument: unmatched(patterns, names) for argument, patterns in selectors.items()}
    missed = {argument: patterns for argument, patterns in missed.items() if patterns}
    if missed:
        shown = ", ".join(repr(n) for n in list(examples if examples is not None else filter(None, names))[:8])
        raise ValueError("; ".join(f"{argument} pattern(s) {patterns} match no {noun} of the model"
                                   for argument, patterns in missed.items())
                         + f" (a typo?); {noun}s look like {shown or 'nothing: the model has none'}")


def unmatched(patterns, names: Iterable[str]) -> List[str]:
    """The patterns (a list from :func:`glob_patterns`; None/callables have none) that match no name."""
    if not isinstance(patterns, list):
        return []
    names = list(names)
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
