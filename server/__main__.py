"""`python -m server [--host H] [--port P] [--model M] [--store DIR] [--auth-file PATH] [limits...]`.

Every flag is also an environment variable PROMPTSERVE_<NAME> (see server/config.py and docs/api.md).

SIGTERM or SIGINT drains: /ready turns 503 and new requests are refused at once, the listening socket closes,
in-flight requests get up to --shutdown-grace-s to finish, whatever is left is cancelled, and the process exits 0.
"""

from __future__ import annotations

import time

LAUNCHED_AT = time.monotonic()  # before the heavy imports, so the ready log can say where start-up time went

import logging  # noqa: E402
import sys  # noqa: E402

import uvicorn  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from server.config import Settings  # noqa: E402


class DrainingServer(uvicorn.Server):
    """uvicorn stops accepting and waits for open requests; we also refuse new work on kept-alive connections."""

    def __init__(self, config: uvicorn.Config, runtime):
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig, frame) -> None:
        if not self.runtime.draining:
            logging.getLogger("server").info("signal %s: draining for up to %.0f s", sig,
                                             self.runtime.settings.shutdown_grace_s)
        self.runtime.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown (exit status "killed by SIGTERM"); a completed drain
        # is a clean exit, so report 0 instead
        self._captured_signals.clear()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
        settings.check_bind()
    except (ValidationError, ValueError) as e:
        print(f"python -m server: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.main import create_app  # torch and the engine load only once the settings are known to be sane

    try:
        app = create_app(settings, launched_at=LAUNCHED_AT)
    except ValueError as e:  # a bad auth file
        print(f"python -m server: {e}", file=sys.stderr)
        return 2
    from prompt_core.arch import UnsupportedModel

    try:  # before uvicorn, so a model we cannot serve is one line of ours and exit status 3, not a traceback
        app.state.runtime.open()
    except UnsupportedModel as e:
        print(f"python -m server: cannot serve model {settings.model!r}: {e}", file=sys.stderr)
        return 3
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s, access_log=True,
                            lifespan="on")
    server = DrainingServer(config, app.state.runtime)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
