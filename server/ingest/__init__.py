"""MQTT ingest: broker messages in, validated, stored once, handed to the fault engine.

`worker` is the MQTT side (paho, shared subscription, manual acks after commit), `registry` the
cached fleet lookups (site codes, agents, units, series) that storage and the worker share.
"""
