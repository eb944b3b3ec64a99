"""Command-line entry points (`python -m pbsd_trl.scripts.<name>`)."""
