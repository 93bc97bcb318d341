"""The jobs of a `-m` sweep, as Hydra's basic sweeper expands them (the pre-flight, sdrun status)."""

from __future__ import annotations

from typing import Any

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def expand_sweep(params: Any, task: list[str], config_loader: Any = None) -> list[list[str]]:
    """Every job's overrides, in Hydra's job order: the preset's `hydra.sweeper.params` first,
    then the command line's sweep overrides (the command line wins for a key in both), split
    by the BasicSweeper itself. Raises Hydra's errors for a sweep syntax it cannot expand."""
    # Hydra's sweeper and parser are imported here, not at the top: `sdrun status` imports this
    # module and only needs them for a sweep it is asked about.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = BasicSweeper(max_batch_size=None, params=params or {})._parse_config() + list(task)
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
