"""SLA clocks of clause 3: targets per class, calendars, pauses, warning/breach/escalation."""
