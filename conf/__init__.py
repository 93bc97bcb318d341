# Makes the config tree importable as `sdrun.conf` (see pyproject.toml), so Hydra can load it
# with `pkg://sdrun.conf` from an editable checkout and from an installed wheel alike.
