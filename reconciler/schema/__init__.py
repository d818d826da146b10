"""Manifest, config and record schemas; safe YAML loading with file:line in every error."""
