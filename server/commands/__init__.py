"""Signed orders to site agents and what became of them (`emu/v1/{site}/cmd` and `cmd/ack`)."""
