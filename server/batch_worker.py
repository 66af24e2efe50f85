"""`python -m server.batch_worker --store DIR [--model M] [server flags]`: run the batches of a shared store without
serving HTTP.

A worker is the server without its listening socket: it loads the model, opens the store and engine exactly as
`python -m server` does (same flags and PROMPTSERVE_* variables; `--auth-file` gives tenants their concurrency,
token rates and weights), and runs the same BatchRunner over the same app in-process, so a line's answer is what
the live route would give. With no interactive traffic its gate is always open: batches get the whole engine.
Batches are claimed under a lease, so workers and servers may share one store; only batches made on this worker's
model (same embedding fingerprint) are claimed. SIGTERM stops the batches where they are (lines in flight are
rerun by whoever resumes them). Run the servers with `--no-batch-runner` to leave all batches to workers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

from pydantic import ValidationError

from server.config import Settings


def run_worker(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run batches until `stop` is set (or SIGTERM/SIGINT in the main thread)."""
    from server.main import create_app

    settings = settings.model_copy(update={"batch_runner": True, "training_runner": False})
    rt = create_app(settings).state.runtime  # the app: the batch's lines run through it in-process
    rt.open()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("server.batch_worker").info("batch worker %s ready: model %s on %s, store %s",
                                                  rt.batch_runner.owner, settings.model, rt.loaded.device,
                                                  settings.store)
    try:
        stop.wait()
    finally:
        rt.batch_runner.stop(timeout_s=60)
        asyncio.run(rt.engine.shutdown(grace_s=0))
        rt.store.close()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv,
                            _cli_prog_name="python -m server.batch_worker")
    except (ValidationError, ValueError) as e:
        print(f"python -m server.batch_worker: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from prompt_core.arch import UnsupportedModel

    try:
        run_worker(settings)
    except UnsupportedModel as e:
        print(f"python -m server.batch_worker: cannot serve model {settings.model!r}: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
