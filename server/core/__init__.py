"""Settings, database and security shared by every server role."""
