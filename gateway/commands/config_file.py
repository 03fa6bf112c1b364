"""The commands on the config file: `check-config` (the file validated, with `FILE:LINE`
warnings for what loads but will surprise: expired keys, allowed models without a price) and
`keys new` (a key minted for a team, with the YAML entry to paste)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import yaml

from gateway.commands.common import EXIT_OK, EXIT_USAGE, known_team, load_or_exit
from gateway.config.loader import GatewayConfig


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.access.keys import today_in

    config = load_or_exit(args.file)
    for warning in expired_key_warnings(config, args.file, today_in(config.limits_timezone)):
        print(warning, file=sys.stderr)
    for warning in unpriced_model_warnings(config, args.file):
        print(warning, file=sys.stderr)
    keys = sum(len(team.keys) for team in config.teams.values())
    print(f"{args.file}: ok ({len(config.teams)} teams, {keys} keys)")
    return EXIT_OK


def expired_key_warnings(config: GatewayConfig, filename: str, today: date) -> list[str]:
    """`FILE:LINE: warning: ...` for each key whose `expires` day is before `today` (the key
    still loads, and is refused with `key_expired`); LINE is its `expires:` line."""
    lines = _expires_lines(config.path)
    return [
        f"{filename}:{lines.get((team.name, key.id), 1)}: warning: key '{key.id}' of team "
        f"'{team.name}' expired on {key.expires.isoformat()}"
        for team in config.teams.values()
        for key in team.keys
        if key.expires is not None and key.expires < today
    ]


def unpriced_model_warnings(config: GatewayConfig, filename: str) -> list[str]:
    """`FILE:LINE: warning: ...` for each model a team's `models` allows that has no price of
    its own in what the team is priced with; LINE is the line of that model's name."""
    lines = _allowed_model_lines(config.path)
    warnings = []
    for team in config.teams.values():
        prices = config.team_prices(team.name)
        for model in sorted(team.models or ()):
            if prices.is_priced(model):
                continue
            found = prices.find(model)
            if prices.unknown_model == "reject":
                fate = "its calls are refused with 400 model_not_priced"
            elif found is not None:
                fate = f"priced as '{found[1]}', the nearest known model of its family"
            else:
                fate = "its calls cost 0"
            warnings.append(
                f"{filename}:{lines.get((team.name, model), 1)}: warning: model '{model}' allowed "
                f"for team '{team.name}' has no price ({fate})"
            )
    return sorted(warnings, key=lambda line: int(line[len(filename) + 1 :].split(":", 1)[0]))


def _team_items(path: Path, field: str) -> Iterator[tuple[str, yaml.Node]]:
    """(team, node) for each item of every team's `field` list in the YAML file, with its
    line numbers (a file that does not parse has none)."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    teams = _entry(root, "teams")
    for team_key, team_node in teams.value if isinstance(teams, yaml.MappingNode) else []:
        items = _entry(team_node, field)
        for item in items.value if isinstance(items, yaml.SequenceNode) else []:
            yield team_key.value, item


def _allowed_model_lines(path: Path) -> dict[tuple[str, str], int]:
    """(team, model) → the line of that model in the team's `models` list (1-based)."""
    return {
        (team, item.value): item.start_mark.line + 1
        for team, item in _team_items(path, "models")
        if isinstance(item, yaml.ScalarNode)
    }


def _expires_lines(path: Path) -> dict[tuple[str, str], int]:
    """(team, key id) → the line of that key's `expires:` (1-based), read from the YAML."""
    found: dict[tuple[str, str], int] = {}
    for team, item in _team_items(path, "keys"):
        key_id, expires = _entry(item, "id"), _entry(item, "expires")
        if isinstance(key_id, yaml.ScalarNode) and expires is not None:
            found[(team, key_id.value)] = expires.start_mark.line + 1
    return found


def _entry(node: yaml.Node | None, name: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((value for key, value in node.value if key.value == name), None)


def cmd_keys_new(args: argparse.Namespace) -> int:
    from gateway.access.keys import mint_key, parse_expiry, today_in

    config = load_or_exit(args.config)
    if not known_team(config, args.team):
        return EXIT_USAGE
    key_id = args.id or f"{args.team}-{len(config.teams[args.team].keys) + 1}"
    try:
        expires = (
            parse_expiry(args.expires, today_in(config.limits_timezone)) if args.expires else None
        )
    except ValueError:
        print(f"--expires: '{args.expires}' is not 30d or YYYY-MM-DD", file=sys.stderr)
        return EXIT_USAGE
    key = mint_key(args.team, key_id, expires)
    print(f"key (shown once, store it now): {key.secret}")
    print(key.yaml_entry)
    return EXIT_OK
