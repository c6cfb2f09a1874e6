"""How every simulation of the suite picks its Hypothesis settings: one switchboard.

The simulations (the object space with and without scaling events, the ownership rules, the
controller's barrier machine) take their settings from :func:`simulation_settings`, so that
the same environment variables steer them all:

* by default a simulation replays one fixed seed (``derandomize=True``): a red run in CI is
  reproducible on any machine, and a green one stays green;
* ``S6_RANDOM=1`` explores: ``derandomize=False`` is set explicitly, which overrides
  Hypothesis's ``ci`` profile (loaded when ``CI`` is set, it fixes the seed), so the run uses
  a fresh seed, or the one given with ``--hypothesis-seed=N`` (how a failure is replayed);
* ``S6_NO_SHRINK=1`` turns shrinking off: a failure is reported as found, in seconds, instead
  of after minutes of shrinking (an object-space failure that showed in 0.4 s took minutes
  to report with it);
* ``S6_SIM_EXAMPLES=F`` multiplies every simulation's ``max_examples`` by ``F`` (a float,
  at least one example): the exploring run of ``make test`` uses it to stay within its time.

``make test`` runs the fixed-seed replays with the rest of the suite, then the simulations
again with a fresh seed that it prints first (see the Makefile's ``explore`` target).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings

__all__ = ["exploring", "simulation_settings"]


def exploring() -> bool:
    """Whether this run explores fresh seeds (``S6_RANDOM`` set and not ``0``)."""
    return os.environ.get("S6_RANDOM", "") not in ("", "0")


def _shrinking() -> bool:
    return os.environ.get("S6_NO_SHRINK", "") in ("", "0")


def simulation_settings(*, max_examples: int, stateful_step_count: int, **extra: Any) -> settings:
    """The settings of one simulation: its size, and the switches of the module docstring.

    ``extra`` passes other settings through (a simulation's own health checks, say)."""
    scale = float(os.environ.get("S6_SIM_EXAMPLES", "1"))
    phases = list(Phase) if _shrinking() else [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(
        max_examples=max(1, round(max_examples * scale)),
        stateful_step_count=stateful_step_count,
        deadline=None,
        derandomize=not exploring(),
        phases=phases,
        suppress_health_check=extra.pop(
            "suppress_health_check", [HealthCheck.too_slow, HealthCheck.filter_too_much]
        ),
        **extra,
    )
