"""`python -m scripts.openapi [--check]`: write the HTTP contract that `GET /openapi.json` serves to
docs/openapi.json, or with `--check` exit 1 if the committed file is not what the app serves.

The app is built by `server.main.create_app` with default settings; no model is loaded (the schema depends on
neither). tests/server/api/test_openapi.py holds the app to the committed file, so a change that moves the
contract changes docs/openapi.json in the same commit, on purpose.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

SNAPSHOT = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


def served() -> str:
    """/openapi.json as the app serves it, indented, keys in the app's own order, with a final newline."""
    from server.config import Settings
    from server.main import create_app

    with tempfile.TemporaryDirectory(prefix="openapi-") as tmp:
        app = create_app(Settings(store=Path(tmp) / "store", auth_file=None))
        return json.dumps(app.openapi(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.openapi", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/openapi.json differs from the app's")
    args = ap.parse_args(argv)
    text = served()
    if args.check:
        same = SNAPSHOT.is_file() and SNAPSHOT.read_text() == text
        print(f"{SNAPSHOT}: {'up to date' if same else 'differs from the app; run python -m scripts.openapi'}")
        return 0 if same else 1
    SNAPSHOT.write_text(text)
    print(f"wrote {SNAPSHOT} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
