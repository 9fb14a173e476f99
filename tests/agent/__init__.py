"""Tests of the site agent (mirrors `agent/`)."""
