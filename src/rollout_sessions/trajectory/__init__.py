"""The trajectory: its store and the rules a turn follows."""
