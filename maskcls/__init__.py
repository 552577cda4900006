"""The library behind the toolkit's scripts: one concept a module (the scripts a user runs stay at the top)."""
