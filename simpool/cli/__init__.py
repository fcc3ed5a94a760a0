"""Command-line front ends of the library (installed as simpool-* scripts; utils/*.py call them)."""
