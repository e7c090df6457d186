"""Everything that reads or writes a model to disk (filled in by the next commit)."""
