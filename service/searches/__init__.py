"""The life of a search in the service: submission, the dispatcher that runs it, its results."""
