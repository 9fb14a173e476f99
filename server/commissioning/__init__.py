"""Commissioning service (service terms, section 4): plans, remote runs, on-site results,
reports, and registering the units that pass into the fleet."""
