"""The HTTP API under `/api/v1/`: dependencies, error mapping, and one router per resource."""
