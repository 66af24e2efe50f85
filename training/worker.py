"""`python -m training worker --store DIR`: train the queued fine-tuning jobs of a shared store on another machine.

The same runner as the server's (training/jobs/), without a serving gate: it trains whenever it holds a job. Jobs
are claimed with a lease, so several workers and servers may share one store; a worker that dies (or loses its
machine) keeps its lease only until it expires, and the job resumes from its checkpoint wherever it is claimed next.
Only jobs made for this worker's model (same embedding fingerprint) are claimed. SIGTERM checkpoints the running job
and hands it back to the queue. Run the servers with `--no-training-runner` to leave all training to workers.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path


def run_worker(store: Path, model: str | None = None, device: str | None = None, dtype: str | None = None,
               threads: int = 0, lease_s: float = 60.0, checkpoint_s: float = 30.0,
               stop: threading.Event | None = None) -> None:
    import torch

    from prompt_core.fingerprint import fingerprint
    from prompt_core.model import load_model
    from prompt_store.store import PromptStore

    from .jobs import JobRunner, JobStore, RunnerConfig, publish_task

    if threads:
        torch.set_num_threads(threads)
    lm = load_model(model, device=device, dtype=dtype)
    fp = fingerprint(lm.model)
    prompts = PromptStore(store, fp, device="cpu", dtype=lm.dtype)
    runner = JobRunner(JobStore(store), lm, lambda rec, out: publish_task(prompts, rec, out),
                       config=RunnerConfig(lease_s=lease_s, checkpoint_every_s=checkpoint_s),
                       base_model=fp.embedding_sha256)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    runner.start()
    logging.getLogger("training.worker").info("worker %s ready: model %s on %s, store %s", runner.owner,
                                               model or "default", lm.device, store)
    stop.wait()
    runner.stop(timeout_s=600)
    prompts.close()
