"""search_spaces: declarative YAML search spaces, their schema, and suggest_arch (trial -> ArchSpec)."""
