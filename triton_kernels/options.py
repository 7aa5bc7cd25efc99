"""Every environment variable the spinquant packages read, read once, in one place.

The product has no runtime switches between kernel variants: each job has one
path. What stays tunable from the environment is operational:

* ``SPINQUANT_WARMUP`` (default on): the vLLM plugin tunes and compiles the GEMM
  for every M bucket of each layer shape while the engine loads, so no request
  pays for it. ``0`` / ``false`` / ``no`` / ``off`` skip it (faster start-up for
  a quick check; the autotuner then tunes on first use).
* ``SPINQUANT_API_KEY`` (default unset): the ``spinquant serve`` key for
  ``Authorization: Bearer`` on ``/v1/*`` when ``--api-key`` is not given.

Code reads :func:`options` and passes the values down; tests build an
:class:`Options` and pass it, or clear the cache with ``options.cache_clear()``
after changing the environment.
"""

from __future__ import annotations

import dataclasses
import functools
import os

_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")

WARMUP_ENV = "SPINQUANT_WARMUP"
API_KEY_ENV = "SPINQUANT_API_KEY"


@dataclasses.dataclass(frozen=True)
class Options:
    """Operational settings (see the module docstring)."""

    warmup: bool = True
    api_key: str | None = None


def _flag(name: str, value: str | None, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    v = value.strip().lower()
    if v in _FALSE:
        return False
    if v in _TRUE:
        return True
    raise ValueError(f"{name} must be one of {list(_TRUE + _FALSE)}, got {value!r}")


def from_environ(environ: dict | None = None) -> Options:
    """Options from ``environ`` (default ``os.environ``); raises on a malformed value."""
    env = os.environ if environ is None else environ
    return Options(warmup=_flag(WARMUP_ENV, env.get(WARMUP_ENV), True),
                   api_key=env.get(API_KEY_ENV) or None)


@functools.cache
def options() -> Options:
    """The process's options, read from the environment on first use."""
    return from_environ()
