"""Experiment runners behind the CLI's configs (only cli/, bench/ and configs/ import this)."""
