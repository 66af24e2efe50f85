"""What a job request means: its method with the CLI's defaults filled in, its TrainConfig, and every check that can
be made before anything is queued (errors are InvalidPrompt, 422, naming the field, file and line)."""

from __future__ import annotations

from pathlib import Path

from prompt_core.spec import make_labels
from prompt_store.errors import InvalidPrompt

from ..config import TrainConfig
from ..data import load_jsonl
from ..methods import make_spec
from .records import API_METHODS, HYPER, INIT_NAME, RUN_DIR, JobRecord


def normalize_method(method: dict | None, file_tasks: list[str]) -> dict:
    """Fill the CLI's defaults into a job's method; InvalidPrompt (422) names a bad field."""
    m = dict(method or {})
    kind = m.get("type", "prompt_tuning")
    if kind not in API_METHODS:
        raise InvalidPrompt(f"method.type expected one of {sorted(API_METHODS)}, found {kind!r}")
    opts = dict(m.get(kind) or {})
    unknown = sorted(set(opts) - {"hyperparameters", "task_type", "labels", "template"})
    if unknown:
        raise InvalidPrompt(f"method.{kind} has unknown fields {unknown}")
    hyper = dict(opts.get("hyperparameters") or {})
    unknown = sorted(set(hyper) - set(HYPER))
    if unknown:
        raise InvalidPrompt(f"method.{kind}.hyperparameters has unknown fields {unknown}; expected {sorted(HYPER)}")
    for k, v in list(hyper.items()):
        if v == "auto" or v is None:  # OpenAI's clients send "auto" for "your default"
            del hyper[k]
    task = opts.get("task_type")
    if task is None:
        task = file_tasks[0] if len(file_tasks) == 1 else ("classify" if opts.get("labels") else "generate")
    if task not in ("classify", "generate"):
        raise InvalidPrompt(f"method.{kind}.task_type expected 'classify' or 'generate', found {task!r}")
    if task not in file_tasks:
        raise InvalidPrompt(f"training_file holds {file_tasks[0]} lines, not {task} ones")
    labels = opts.get("labels")
    if labels is not None:
        if task != "classify":
            raise InvalidPrompt(f"method.{kind}.labels is for task_type 'classify'")
        try:
            labels = [{"name": lab.name, "verbalizer": lab.verbalizer} for lab in make_labels(labels)]
        except (ValueError, TypeError) as e:
            raise InvalidPrompt(f"method.{kind}.labels: {e}") from None
    template = opts.get("template", "{input}")
    if not isinstance(template, str):
        raise InvalidPrompt(f"method.{kind}.template must be a string")
    return {"type": kind, "task_type": task, "labels": labels, "template": template, "hyperparameters": hyper}


def train_config(rec: JobRecord, job_dir: Path, device: str | None = None, dtype: str | None = None,
                 labels_from_data: bool = True) -> TrainConfig:
    """The TrainConfig of a job: exactly what `python -m training train` builds from the same options."""
    m = rec.method
    data = job_dir / "train.jsonl"
    labels = ()
    if m["task_type"] == "classify":
        if m["labels"]:
            labels = make_labels({x["name"]: x["verbalizer"] for x in m["labels"]})
        elif labels_from_data:
            labels = make_labels(sorted({e.target for e in load_jsonl(data, "classify")}))
    kw = {HYPER[k]: v for k, v in m["hyperparameters"].items()}
    if rec.init_from:
        kw["init_from"] = job_dir / INIT_NAME
    return TrainConfig(method=API_METHODS[m["type"]], task=m["task_type"], data=data, out=job_dir / RUN_DIR,
                       eval_data=job_dir / "valid.jsonl" if rec.validation_file else None, labels=labels,
                       template=m["template"], seed=rec.seed, device=device, dtype=dtype,
                       extra={"task_id": rec.task_id, "description": describe(rec)}, **kw)


def describe(rec: JobRecord) -> str:
    return f"{rec.method['type']} ({rec.method['task_type']}) trained by fine-tuning job {rec.id}"


def validate_job(rec: JobRecord, train_file: Path, valid_file: Path | None) -> None:
    """Everything that can be known before training: options, labels against the data, the template. Errors name
    the file and line (InvalidPrompt, 422)."""
    try:
        cfg = train_config(rec, train_file.parent, labels_from_data=False)
        cfg.data, cfg.eval_data = train_file, valid_file
        names = {x["name"] for x in rec.method["labels"]} if rec.method["labels"] else None
        train_ex = load_jsonl(train_file, cfg.task, names)
        if cfg.task == "classify" and names is None:
            names = {e.target for e in train_ex}
            if len(names) < 2:
                raise ValueError(f"{train_file}: a classify job needs at least two labels, found {sorted(names)}")
        if valid_file is not None:
            load_jsonl(valid_file, cfg.task, names)
        elif len(train_ex) < 2:
            raise ValueError(f"{train_file}: need at least 2 examples to hold some out, or a validation_file")
        spec = make_spec(cfg, cfg.labels or (make_labels(sorted(names)) if names else ()))
    except (ValueError, TypeError) as e:
        message = str(e).replace(str(train_file), rec.training_file)
        if valid_file is not None:
            message = message.replace(str(valid_file), str(rec.validation_file))
        raise InvalidPrompt(message) from None
    rec.method["resolved"] = {"n_epochs": cfg.epochs, "batch_size": cfg.batch_size, "learning_rate": cfg.lr,
                              "num_virtual_tokens": spec.num_virtual_tokens}


def continued_method(method: dict | None, task: dict) -> dict:
    """The job's method with the continued task's kind, template, labels, task type and size as defaults."""
    kind = task["kind"]
    if kind not in API_METHODS:
        raise InvalidPrompt(f"model {task['key']!r} is a {kind} prompt, which has no trained tensors to continue; "
                            "train from 'default' with its template instead")
    if kind == "p_tuning":
        raise InvalidPrompt(f"model {task['key']!r} is a P-tuning prompt, whose encoder is not stored with the task; "
                            "it cannot be continued (train from 'default')")
    m = dict(method or {"type": kind})
    m.setdefault("type", kind)
    if m["type"] != kind:
        raise InvalidPrompt(f"method.type {m['type']!r} cannot continue model {task['key']!r}, a {kind} prompt")
    opts = dict(m.get(kind) or {})
    opts.setdefault("template", task["template"])
    opts.setdefault("task_type", task["task_type"])
    if task["task_type"] == "classify" and task["labels"]:
        opts.setdefault("labels", {x["name"]: x["verbalizer"] for x in task["labels"]})
    hyper = dict(opts.get("hyperparameters") or {})
    if hyper.get("num_virtual_tokens", task["num_virtual_tokens"]) != task["num_virtual_tokens"]:
        raise InvalidPrompt(f"num_virtual_tokens must stay {task['num_virtual_tokens']} to continue "
                            f"{task['key']!r}, found {hyper['num_virtual_tokens']}")
    hyper["num_virtual_tokens"] = task["num_virtual_tokens"]
    if hyper.get("prefix_projection"):
        raise InvalidPrompt("prefix_projection cannot continue a stored prefix (the MLP is not stored)")
    opts["hyperparameters"] = hyper
    m[kind] = opts
    return m
