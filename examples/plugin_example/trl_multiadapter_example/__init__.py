"""Example trl-multiadapter plugin (see plugin.py and README.md)."""
