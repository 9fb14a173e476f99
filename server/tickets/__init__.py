"""Service requests (tickets): their state machine, timeline, links and spare parts."""
