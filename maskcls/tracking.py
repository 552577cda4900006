"""Small, failure-tolerant MLflow wrapper used by train.py (and, with --tracking_uri, by
evaluation.py, inference.py and calibrate.py: `add_tracking_flags` + `step_tracker`).

One Tracker = one MLflow run. Design choices:
- MlflowClient only (no fluent API), so no global "active run" leaks between Trackers.
- A tracking server that is down at start() is a hard error (TrackingError, before any
  training); a failure later only prints one warning and the Tracker becomes a no-op, so a
  tracking outage never costs a training run.
- mlflow is imported lazily: a disabled Tracker (other ranks, `--tracking_uri none`) costs nothing.
- A training run records MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py)
  every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10) from start() to finish().
- An evaluation step may attach to an existing run (e.g. the training run of its checkpoint): it
  adds metrics, tags and artifacts there and leaves the run's status and end time alone.
"""
from __future__ import annotations

import contextlib
import getpass
import io
import json
import logging
import math
import os
import re
import shlex
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TextIO, TypeVar

from maskcls.cli import ToolkitError, UsageError
# Imported where used, being heavy or optional: mlflow (a second or more to import; nothing when tracking is off).

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mask-classification"  # every script's default experiment
DISABLED_URIS = {"none", "off", "disabled"}
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
REACHABILITY_TIMEOUT_S = 5.0
# MLflow's HTTP client defaults to 7 retries with exponential backoff and a 120 s timeout,
# i.e. minutes per call against a dead server; these make a dead server show up in seconds.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
# MLflow limits (mlflow.utils.validation).
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LEN = 6000
SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins
SYSTEM_METRICS_STOP_TIMEOUT_S = 10.0  # finish() waits at most this long for the sampler's last flush
T = TypeVar("T")


class TrackingError(RuntimeError):
    """Tracking cannot start; the message is one line meant for the user."""


def check_model_name(name: str, flag: str = "--register_model") -> str:
    """A Model Registry name as MLflow accepts it (checked before any work)."""
    if not name.strip() or any(c in name for c in "/:") or name.strip() in (".", ".."):
        raise UsageError(f"{flag} must be a model name without '/' or ':', e.g. mask-classifier; got {name!r}")
    return name


def class_metrics(prefix: str, values) -> dict[str, float]:
    """One metric per class, named so that they sort: `holdout_f1_class_03`."""
    return {f"{prefix}_class_{c:02d}": float(v) for c, v in enumerate(values)}


def resolve_tracking_uri(cli_uri: str | None) -> str:
    """`--tracking_uri`, else $MLFLOW_TRACKING_URI, else a local sqlite store in the cwd."""
    for candidate in (cli_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return DEFAULT_TRACKING_URI


def absolute_sqlite(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/path/relative.db. MLflow caches one store per URI string
    for the life of the process, so a relative one would keep writing to the first folder's database
    after a chdir (notebooks, test runs); the absolute one is also what a resume from elsewhere needs."""
    prefix = "sqlite:///"
    if not uri.lower().startswith(prefix) or uri[len(prefix):].startswith("/"):
        return uri
    path, sep, query = uri[len(prefix):].partition("?")
    if not path or path == ":memory:":
        return uri
    return f"{prefix}{Path(path).resolve()}{sep}{query}"


def resolve_experiment(cli_name: str | None, default: str) -> str:
    """`--experiment`, else $MLFLOW_EXPERIMENT_NAME (MLflow's own variable), else `default`."""
    for candidate in (cli_name, os.environ.get("MLFLOW_EXPERIMENT_NAME")):
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return default


def resolve_user(cli_user: str | None) -> str | None:
    """`--user`, else $USER, else the account name (containers and CI often have no $USER),
    as MLflow itself does; None only where no account name can be had."""
    if cli_user:
        return cli_user
    if os.environ.get("USER"):
        return os.environ["USER"]

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry for the uid (some containers)
        return None


def tracking_disabled(uri: str | None) -> bool:
    return uri is None or uri.strip().lower() in DISABLED_URIS


def require_tracking(cli_uri: str | None, need: str) -> str:
    """The URI of a step that logs to MLflow or nothing (`need` says which, e.g. "--register_model needs
    MLflow tracking"); UsageError when tracking is off, naming what turned it off: the flag or the variable."""
    uri = resolve_tracking_uri(cli_uri)
    if tracking_disabled(uri):
        fix = (f"drop --tracking_uri {uri}" if cli_uri and cli_uri.strip()
               else f"MLFLOW_TRACKING_URI is {uri!r}: unset it or pass --tracking_uri URI")
        raise UsageError(f"{need}; {fix}")
    return uri


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _one_line(reason: object, limit: int = 300) -> str:
    text = " ".join(str(reason).split())
    if isinstance(reason, BaseException):
        text = f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _param_str(value: Any) -> str:
    """Readable, stable string for a param value (lists as space-separated, like the CLI)."""
    if isinstance(value, (list, tuple)):
        text = " ".join(_param_str(v) for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True, default=str)
    elif isinstance(value, Path):
        text = str(value)
    else:
        text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE_LEN else text[: MAX_PARAM_VALUE_LEN - 3] + "..."


def _same_param(logged: str, new: str) -> bool:
    """`mlflow run` logs shell-quoted values ('64 48', ''); compare them unquoted."""
    if logged == new:
        return True

    try:
        return " ".join(shlex.split(logged)) == " ".join(shlex.split(new))
    except ValueError:
        return False


def _local_artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite file store: artifacts in <db folder>/mlruns/<experiment>.

    MLflow's own default is ./mlruns in the *current* directory, so a run against a store
    elsewhere would scatter artifacts into whatever folder training was started from."""
    if not uri.lower().startswith("sqlite:///"):
        return None  # servers choose their own artifact root
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(db).resolve().parent / "mlruns" / folder).as_uri()


def _check_reachable(uri: str) -> None:
    """Any HTTP answer counts as reachable; auth or API errors surface in the first real call."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=REACHABILITY_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # the server answered (e.g. 404 behind a proxy prefix, 401 with auth)
    except Exception as exc:  # URLError, timeout, connection refused, bad host
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable: {_one_line(reason, 200)}; start it, "
            "fix --tracking_uri/MLFLOW_TRACKING_URI, or pass --tracking_uri none to disable tracking"
        ) from None


class Tracker:
    """One MLflow run; every method is a no-op when disabled or after tracking was lost."""

    def __init__(self, uri: str, experiment: str, run_name: str, user: str | None,
                 enabled: bool = True, system_metrics: bool = True, announce_to: TextIO | None = None,
                 lost_note: str = "training continues, later metrics are not logged") -> None:
        """`system_metrics`: sample CPU/memory/GPU into the run (training runs); `announce_to`: where
        the run's link is printed (default stdout); `lost_note`: what the one warning on losing
        tracking says happens next (a script other than train.py has no training to continue)."""
        self.uri = absolute_sqlite(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.user = user
        self.enabled = enabled and not tracking_disabled(uri)
        self.system_metrics = system_metrics
        self.announce_to = announce_to
        self.lost_note = lost_note
        self._client = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._lost = False
        self._finished = False
        self._attached = False
        self._monitor = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def active(self) -> bool:
        return self._run_id is not None and not self._lost and not self._finished

    # ---- start -------------------------------------------------------------------------------
    def start(self, params: dict, resume_run_id: str | None = None, parent: "Tracker | None" = None,
              attach_run_id: str | Callable[[Any], str | None] | None = None) -> None:
        """Open the run (or join the one `mlflow run` created) and log every param. With `parent`
        (an active Tracker), the run is its child: same experiment, tag mlflow.parentRunId, shown
        nested under it in the UI (the folds of a cross-validation). With `attach_run_id`, log into
        that existing run without changing its status; `params` become tags there (params are
        write-once, and an evaluation may be repeated). It may be a function of the MlflowClient
        (called once the server is known to answer); when that returns None, a new run is made.

        Raises TrackingError with a one-line message if tracking cannot start."""
        if not self.enabled or self._run_id is not None:
            return
        if _is_http(self.uri):
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)  # the user's own settings win
            _check_reachable(self.uri)
        try:
            from mlflow import MlflowClient

            # MLflow logs table creation, run URLs etc. at INFO with emoji; keep warnings only.
            # After the import: `import mlflow` configures its loggers and would reset the level.
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            logging.getLogger("alembic").setLevel(logging.WARNING)

            self._client = MlflowClient(tracking_uri=self.uri)
            parent = parent if parent is not None and parent.active else None
            parent_run_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
            if callable(attach_run_id):
                attach_run_id = attach_run_id(self._client)
            if attach_run_id:
                self._attach(attach_run_id)
            elif parent_run_id and parent is None:
                self._join_run(parent_run_id)
            elif resume_run_id:  # --resume: continue the interrupted run's metric history
                try:
                    self._join_run(resume_run_id)
                except TrackingError:
                    print(f"warning: run {resume_run_id} of the resumed checkpoint is not on {self.uri}; "
                          "logging to a new run", file=sys.stderr)
                    self._create_run(parent)
            else:
                self._create_run(parent)
            if self._attached:
                from mlflow.entities import RunTag

                self._client.log_batch(self._run_id, tags=[RunTag(k, _param_str(v)) for k, v in params.items()])
            else:
                self._log_params(params)
        except TrackingError:
            self._run_id = None
            raise
        except Exception as exc:
            self._run_id = None
            raise TrackingError(
                f"MLflow tracking at {self.uri} failed to start a run: {_one_line(exc)}; "
                "fix --tracking_uri/MLFLOW_TRACKING_URI, or pass --tracking_uri none to disable tracking"
            ) from None
        where = (f"{self.uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}"
                 if _is_http(self.uri) else f"{self.uri} (experiment id {self._experiment_id})")
        print(f"MLflow run {self._run_id}: {where}", file=self.announce_to or sys.stdout, flush=True)
        if self.system_metrics and not self._attached:
            self._start_system_metrics(resume=bool(resume_run_id or parent_run_id))

    def _attach(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(f"--run_id {run_id} is not a run on {self.uri} ({_one_line(exc, 150)})") from None
        self._run_id, self._experiment_id, self._attached = run.info.run_id, run.info.experiment_id, True

    def _start_system_metrics(self, resume: bool) -> None:
        """MLflow's sampler thread (CPU, memory, disk, network; GPU where nvidia-ml-py finds one).
        Best effort: without psutil, or if it fails to start, the run goes on without it."""
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in ("false", "0"):
            return  # MLflow's own switch, set to off explicitly
        # Its thread logs retries and flush errors itself; our own calls report an outage once.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self._run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                                 resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as exc:  # e.g. psutil missing
            self._monitor = None
            print(f"warning: MLflow system metrics are not recorded ({_one_line(exc, 150)})",
                  file=sys.stderr, flush=True)

    def _stop_system_metrics(self) -> None:
        """Stop the sampler and flush its last samples; bounded, and not waited for once tracking is
        lost (its flush would only time out)."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        stopper = threading.Thread(target=monitor.finish, name="stop-system-metrics", daemon=True)
        stopper.start()
        stopper.join(timeout=0 if self._lost else SYSTEM_METRICS_STOP_TIMEOUT_S)

    def _join_run(self, run_id: str) -> None:
        """Under `mlflow run`: log into its run and experiment, whatever `experiment` says."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(
                f"MLFLOW_RUN_ID={run_id} is not a run on {self.uri} ({_one_line(exc, 150)}); "
                "unset MLFLOW_RUN_ID or point --tracking_uri at the server that created it"
            ) from None
        self._run_id = run.info.run_id
        self._experiment_id = run.info.experiment_id
        if run.info.status != "RUNNING":
            self._client.update_run(self._run_id, status="RUNNING")
        if self.user:
            self._client.set_tag(self._run_id, "user", self.user)

    def _create_run(self, parent: "Tracker | None" = None) -> None:
        from mlflow.exceptions import MlflowException

        tags = {"user": self.user} if self.user else {}
        if parent is not None:
            self._experiment_id = parent.experiment_id
            tags["mlflow.parentRunId"] = parent.run_id
            self._run_id = self._client.create_run(self._experiment_id, tags=self._default_tags(tags),
                                                   run_name=self.run_name).info.run_id
            return
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                self._experiment_id = self._client.create_experiment(
                    self.experiment, artifact_location=_local_artifact_location(self.uri, self.experiment))
            except MlflowException:
                exp = self._client.get_experiment_by_name(self.experiment)  # created concurrently
                if exp is None:
                    raise
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment '{self.experiment}' is deleted on {self.uri}; restore it "
                    "(mlflow experiments restore) or choose another --experiment"
                )
            self._experiment_id = exp.experiment_id
        run = self._client.create_run(self._experiment_id, tags=self._default_tags(tags), run_name=self.run_name)
        self._run_id = run.info.run_id

    @staticmethod
    def _default_tags(tags: dict) -> dict:
        """The fluent API's default tags (source file, git commit, OS user) under ours."""
        try:
            from mlflow.tracking.context.registry import resolve_tags

            return resolve_tags(tags)
        except Exception:
            return tags

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        logged = self._client.get_run(self._run_id).data.params
        todo: list[Param] = []
        for key, value in params.items():
            text = _param_str(value)
            key = str(key)
            if key in logged:
                if _same_param(logged[key], text):
                    continue
                # Param values are immutable; `mlflow run` already logged what the user typed,
                # so keep what train.py actually used next to it.
                key = f"{key}.resolved"
                if key in logged:
                    continue
            todo.append(Param(key, text))
        for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=todo[i:i + MAX_PARAMS_PER_BATCH])

    # ---- during the run -----------------------------------------------------------------------
    def _lose(self, exc: BaseException) -> None:
        self._lost = True
        print(f"warning: MLflow tracking lost ({_one_line(exc)}); {self.lost_note}", file=sys.stderr, flush=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if value is None:  # e.g. validation metrics under --mode all
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):  # a caller mistake, not a tracking outage
                print(f"warning: metric {key}={value!r} is not a number; not logged",
                      file=sys.stderr, flush=True)
                continue
            if not math.isinf(value):  # MLflow rejects infinities; NaN is stored as NaN
                batch.append(Metric(str(key), value, now, int(step)))
        try:
            for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])
        except Exception as exc:
            self._lose(exc)

    def call(self, step: Callable[[Any, str], T], required: bool = False) -> T | None:
        """Run `step(client, run_id)` as one tracking step (e.g. logging a model): skipped when
        inactive; an exception loses tracking with the one warning, so it never costs the caller.
        `required`: the step is the caller's whole purpose (`python -m serving`), so its failure is
        a TrackingError (a ToolkitError as it is) instead of a warning; tracking is lost either way."""
        if not self.active:
            return None
        try:
            return step(self._client, self._run_id)
        except Exception as exc:
            if not required:
                self._lose(exc)
                return None
            self._lost = True  # finish() then makes one quiet attempt, no second message

            if isinstance(exc, ToolkitError):
                raise
            raise TrackingError(f"MLflow tracking at {self.uri} failed: {_one_line(exc)}") from None

    def log_dict(self, obj: dict, name: str) -> None:
        """A JSON artifact `name` made from `obj` (no file of ours needed)."""
        self.call(lambda client, run_id: client.log_dict(run_id, obj, name))

    def log_artifact(self, path: str | Path) -> None:
        if not self.active:
            return
        path = Path(path)
        if not path.exists():  # a caller mistake, not a tracking outage: keep tracking
            print(f"warning: MLflow artifact {path} does not exist; not logged",
                  file=sys.stderr, flush=True)
            return
        try:
            if path.is_dir():
                self._client.log_artifacts(self._run_id, str(path), artifact_path=path.name)
            else:
                self._client.log_artifact(self._run_id, str(path))
        except Exception as exc:
            self._lose(exc)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED / FAILED / KILLED. Idempotent; never raises for MLflow errors."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"unknown run status {status!r}; known: {', '.join(TERMINAL_STATUSES)}")
        if self._run_id is None or self._finished:
            return
        self._finished = True
        self._stop_system_metrics()
        if self._attached:
            return  # someone else's run: its status and end time stay as they were
        try:
            if self._lost:
                # One quiet best-effort attempt (a dead server fails on the first call) so a
                # transient outage does not leave the run RUNNING forever; the tag tells
                # readers that metrics are missing.
                self._client.set_tag(self._run_id, "tracking_lost", "true")
            # set_terminated writes emoji "View run" links to stdout; start() printed the link.
            with contextlib.redirect_stdout(io.StringIO()):
                self._client.set_terminated(self._run_id, status=status)
        except Exception as exc:
            if not self._lost:
                self._lose(exc)

    # ---- as a context manager: `with tracker:` ends the run with the status the block earned
    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """FINISHED on success, KILLED on Ctrl-C / SIGTERM, FAILED on any other exception."""
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")
        return False


# ---- evaluation steps (evaluation.py, inference.py, calibrate.py): off unless --tracking_uri is given
CHECKPOINT_RUN = "checkpoint"


def add_tracking_flags(parser, checkpoint_run: bool = False) -> None:
    """--tracking_uri (off by default: a submission needs no server), --experiment, --run_name,
    --run_id, --user. `checkpoint_run`: the script knows a model, so `--run_id checkpoint` means the
    training run recorded in its checkpoint (a --fold all folder: the parent run)."""
    g = parser.add_argument_group("MLflow tracking (off unless --tracking_uri is given)")
    g.add_argument("--tracking_uri", default=None,
                   help="log this step's results to MLflow at URI (e.g. http://server:5000, sqlite:///mlflow.db); "
                        "default: nothing is logged and no server is needed")
    g.add_argument("--experiment", default=None,
                   help=f"experiment of a new run (default $MLFLOW_EXPERIMENT_NAME, else {DEFAULT_EXPERIMENT})")
    g.add_argument("--run_name", default=None, help="name of the new run (default: the script's name)")
    g.add_argument("--run_id", default=None,
                   help="log into this existing run instead of a new one (e.g. the training run, printed by train.py)"
                        + (f"; '{CHECKPOINT_RUN}': the training run recorded in the model's last.pth" if checkpoint_run
                           else ""))
    g.add_argument("--user", default=None, help="tag 'user' of a new run (default $USER, else the account name)")


def step_tracker(args, script: str, params: dict, checkpoint_run: Callable[[Any], str] | None = None,
                 announce_to: TextIO | None = None) -> Tracker:
    """The started Tracker of an evaluation step: disabled without --tracking_uri; else a new run
    (`--run_name`, default `script`) or the existing `--run_id` (`checkpoint_run(client)` resolves
    --run_id checkpoint, raising a ToolkitError when no run is recorded). Params are prefixed with
    `script` so they never collide with a training run's. Bad flags, an unknown run or an
    unreachable server: cli.UsageError (one line, exit 2) before any work."""
    if args.tracking_uri is None or tracking_disabled(args.tracking_uri):
        given = [f"--{k}" for k in ("run_id", "run_name", "experiment") if getattr(args, k)]
        if given and args.tracking_uri is None:
            raise UsageError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --tracking_uri "
                             "(tracking is off by default)")
        return Tracker("none", "", script, None, enabled=False)
    if args.run_id and args.run_name:
        raise UsageError("--run_id logs into an existing run, --run_name names a new one: give one of them")
    run_id = args.run_id
    if run_id == CHECKPOINT_RUN and checkpoint_run is not None:
        def run_id(client) -> str:  # called once the server answers
            try:
                return checkpoint_run(client)
            except ToolkitError as e:
                raise TrackingError(str(e)) from None
    tracker = Tracker(args.tracking_uri.strip(), resolve_experiment(args.experiment, DEFAULT_EXPERIMENT),
                      args.run_name or script, resolve_user(args.user), system_metrics=False, announce_to=announce_to)
    try:
        tracker.start({f"{script}.{k}": v for k, v in params.items()}, attach_run_id=run_id)
    except TrackingError as e:
        raise UsageError(str(e)) from None
    return tracker
