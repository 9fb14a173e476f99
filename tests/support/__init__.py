"""Helpers shared by the test suite: real services, free ports and deadline-based waiting.

`broker` runs or locates an MQTT broker, `database` picks the test database URL, `net` finds
ports and probes sockets, `waiting` replaces fixed sleeps with waits on a condition.
"""
