"""The core of the service: settings, database, tables, secrets, paths, redaction."""
