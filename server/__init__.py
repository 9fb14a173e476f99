"""The central server: ingest, storage, fault classification, API."""

__version__ = "0.1.0"
