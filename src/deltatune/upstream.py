"""What deltatune assumes of the libraries it builds on, kept in one place.

Upstream moves: transformers 5.24 renamed the cache argument of every model and attention
forward (``past_key_values`` -> ``cache``, the old name accepted until 5.40). Code that reads or
passes a cache goes through :func:`passed_cache` and :func:`cache_keyword`, which decide from
the call's own arguments and the forward's signature, never from a version string.

The versions the suite was run against are listed in :data:`TESTED`; outside that range
deltatune still runs, but says so once (:func:`warn_if_untested`).
"""

from __future__ import annotations

import inspect
import sys
from importlib import metadata
from typing import Any, Callable, Mapping

from packaging.version import Version

#: the cache argument's names, the current one first
CACHE_ARGUMENTS = ("cache", "past_key_values")

#: (oldest, newest) release of each dependency the test suite passed against; kept equal to
#: the lower bounds in pyproject.toml and the newest run of scripts/compat.sh
TESTED = {
    "transformers": ("5.16.0", "5.25.0"),
    "bitsandbytes": ("0.50.0", "0.50.2"),
}


def passed_cache(arguments: Mapping[str, Any]) -> Any:
    """The KV cache a forward was called with, under whichever name it was passed; None if none."""
    for name in CACHE_ARGUMENTS:
        value = arguments.get(name)
        if value is not None:
            return value
    return None


def cache_keyword(forward: Callable) -> str:
    """The name under which ``forward`` (a model's or module's forward) takes its cache."""
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return CACHE_ARGUMENTS[-1]
    return next((name for name in CACHE_ARGUMENTS if name in parameters), CACHE_ARGUMENTS[-1])


def untested(installed: Mapping[str, str] | None = None) -> list[str]:
    """One phrase per installed dependency whose version lies outside :data:`TESTED`."""
    found = []
    for name, (oldest, newest) in TESTED.items():
        if installed is not None:
            version = installed.get(name)
        else:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = None
        if version is None:
            continue
        if not Version(oldest) <= Version(Version(version).base_version) <= Version(newest):
            found.append(f"{name} {version} (tested {oldest} to {newest})")
    return found


_warned = False


def warn_if_untested() -> None:
    """Say once, on one line of stderr, which installed dependencies lie outside the tested range."""
    global _warned
    if _warned:
        return
    _warned = True
    found = untested()
    if found:
        print(f"deltatune: untested versions installed: {'; '.join(found)}. "
              "If something fails, scripts/setup_env.sh installs the tested set.", file=sys.stderr)
