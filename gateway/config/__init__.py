"""The YAML config: its schema, each key declared once, read into frozen dataclasses."""
