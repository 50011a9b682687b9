"""Chat data preparation (placeholder, filled below)."""
