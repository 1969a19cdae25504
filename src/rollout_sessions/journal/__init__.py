"""The journal: an SQLite database written ahead of every answer."""
