"""Render ``gateway.config.schema`` as a JSON Schema (draft 2020-12) for editors.

Regenerate the committed copy with::

    python -m gateway.config.jsonschema_gen > config/schema.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gateway.config.schema import ROOT
from gateway.config.validate import JsonGen

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, from the same declarations as the validator."""
    gen = JsonGen()
    root = gen.render(ROOT)
    return {
        "$schema": DRAFT,
        "title": "pygateway configuration",
        **root,
        "$defs": dict(sorted(gen.defs.items())),
    }


def render() -> str:
    """The exact text of config/schema.json."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
