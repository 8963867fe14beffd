"""service: the REST API, users, the dispatcher, the dashboard and the spsa-nas command line."""
