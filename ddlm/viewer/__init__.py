"""Viewers of a draw: the terminal (`--show`) and a self-contained HTML page (`--show-html`)."""
