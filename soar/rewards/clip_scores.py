"""Scorer module being written (issue #5); registers nothing yet."""
