"""The YAML config: parsed, validated with `file:line` errors, into frozen dataclasses."""
