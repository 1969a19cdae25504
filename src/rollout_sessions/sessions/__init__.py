"""The session service: the one owner of session state and its durability."""
