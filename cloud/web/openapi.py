"""Print the OpenAPI schema of ``framecap web``'s API: ``python -m cloud.web.openapi``.

``docs/openapi.json`` is this output; ``tests/web/test_openapi.py`` fails when it is stale.
Refresh it with ``python -m cloud.web.openapi > docs/openapi.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, cast

from cloud.web.auth import Accounts
from cloud.web.index import CaptionIndex

REFRESH_COMMAND = "python -m cloud.web.openapi > docs/openapi.json"


def schema() -> dict[str, Any]:
    """The API's OpenAPI 3 schema (an app built around placeholders: nothing is opened)."""
    from cloud.web.app import create_app
    from cloud.web.deps import WebContext

    ctx = WebContext(index=cast(CaptionIndex, object()), accounts=Accounts(), session_secret="schema-only")
    return create_app(ctx).openapi()


def render() -> str:
    """The schema as checked in: sorted keys, two-space indent, a final newline."""
    return json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloud.web.openapi",
        description=f"Print the OpenAPI schema of framecap web's API (refresh: {REFRESH_COMMAND}).")
    parser.parse_args(argv)
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
