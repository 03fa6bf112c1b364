"""YAML config → frozen dataclasses, validated with `file:line: message` errors.

The schema (`schema.py`) declares each key once; the reader (`reader.py`) checks a file
against it, collecting every problem before failing, so `check-config` can list them all.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.config.checks import (
    HTTP_METHODS,
    NANOUSD_PER_USD,
    EndpointRule,
    parse_size,
    usd_to_nanousd,
)
from gateway.config.nodes import Problems, compose
from gateway.config.reader import Context, read_section
from gateway.config.reference import documented_keys, reference_rows
from gateway.config.schema import (
    DEFAULT_MAX_REQUEST_BODY,
    AdminConfig,
    Billing,
    GatewayConfig,
    KeyConfig,
    Limits,
    LimitsBackendConfig,
    ListenConfig,
    PricingConfig,
    QueueConfig,
    StorageConfig,
    TeamConfig,
    TeamUpstream,
    UpstreamConfig,
)

__all__ = [
    "CONFIG_ENV", "DEFAULT_CONFIG_PATH", "DEFAULT_MAX_REQUEST_BODY", "HTTP_METHODS",
    "NANOUSD_PER_USD", "AdminConfig", "Billing", "ConfigError", "EndpointRule", "GatewayConfig",
    "KeyConfig", "Limits", "LimitsBackendConfig", "ListenConfig", "PricingConfig", "QueueConfig",
    "StorageConfig", "TeamConfig", "TeamUpstream", "UpstreamConfig", "config_path_from",
    "documented_keys", "load_config", "parse_config", "parse_size", "reference_rows",
    "usd_to_nanousd",
]  # fmt: skip

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
CONFIG_ENV = "GATEWAY_CONFIG"


class ConfigError(Exception):
    """Every problem found in a config file, each as `file:line: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_config(text: str, path: Path) -> GatewayConfig:
    """Parse and validate config text; raises ConfigError listing every problem."""
    problems = Problems(str(path))
    document = compose(text, problems)
    if document is None:
        if not problems:
            problems.add(None, "the config is empty")
        raise ConfigError(problems.sorted())
    config = read_section(
        GatewayConfig, document, "config", problems, Context(config_dir=path.parent),
        prefix="", identity={"path": path},
    )  # fmt: skip
    if problems or config is None or config.pricing is None:
        raise ConfigError(problems.sorted())
    return config


def load_config(path: str | Path) -> GatewayConfig:
    config_path = Path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{config_path}:1: cannot read the config: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{config_path}:1: the config is not UTF-8 text"]) from exc
    return parse_config(text, config_path)


def config_path_from(cli_value: str | None) -> Path:
    """`--config`, else `$GATEWAY_CONFIG`, else config/gateway.yaml."""
    return Path(cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
