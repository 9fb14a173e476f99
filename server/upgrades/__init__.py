"""Software upgrades: signed releases, written plans, staged rollouts (issue 7)."""
