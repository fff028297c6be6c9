"""Write docs/config.md from the config dataclasses (the single source of every key's type, default and meaning).

Run `make docs` after changing src/longtune/config.py; a test fails when docs/config.md is out of date.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from longtune.config import GROUPS, _type_name

HEADER = """# Configuration reference

Generated from `src/longtune/config.py` by `scripts/gen_config_docs.py` (`make docs`); do not edit by hand.

A config is a flat YAML mapping; `longtune train CONFIG.yaml key=value ...` applies command-line overrides
(values parsed as YAML scalars). Key names follow LLaMA-Factory where the concept exists. An unknown key, a
wrong type or an impossible combination stops the run before anything loads, with a one-line error naming the key.
"""


def render() -> str:
    parts = [HEADER]
    for group, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        parts.append(f"\n## {group}\n\n| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for f in dataclasses.fields(cls):
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(default) or "(empty)"
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
            kind = _type_name(hints[f.name]).replace("|", "\\|")
            meaning = f.metadata["help"].replace("|", "\\|")
            parts.append(f"| `{f.name}` | {kind} | `{shown}` | {meaning} |")
    return "\n".join(parts) + "\n"


def main() -> int:
    target = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    target.parent.mkdir(exist_ok=True)
    target.write_text(render())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
