"""Small, failure-tolerant MLflow wrapper used by train.py.

One Tracker = one MLflow run. Design choices:
- MlflowClient only (no fluent API), so no global "active run" leaks between Trackers.
- A tracking server that is down at start() is a hard error (TrackingError, before any
  training); a failure later only prints one warning and the Tracker becomes a no-op, so a
  tracking outage never costs a training run.
- mlflow is imported lazily: a disabled Tracker (other ranks, `--tracking_uri none`) costs nothing.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
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


class TrackingError(RuntimeError):
    """Tracking cannot start; the message is one line meant for the user."""


def resolve_tracking_uri(cli_uri: str | None) -> str:
    """`--tracking_uri`, else $MLFLOW_TRACKING_URI, else a local sqlite store in the cwd."""
    for candidate in (cli_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return DEFAULT_TRACKING_URI


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
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry for the uid (some containers)
        return None


def _is_disabled_uri(uri: str | None) -> bool:
    return uri is None or uri.strip().lower() in DISABLED_URIS


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
    import shlex

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
                 enabled: bool = True) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.user = user
        self.enabled = enabled and not _is_disabled_uri(uri)
        self._client = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._lost = False
        self._finished = False

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
    def start(self, params: dict, resume_run_id: str | None = None, parent: "Tracker | None" = None) -> None:
        """Open the run (or join the one `mlflow run` created) and log every param. With `parent`
        (an active Tracker), the run is its child: same experiment, tag mlflow.parentRunId, shown
        nested under it in the UI (the folds of a cross-validation).

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
            if parent_run_id and parent is None:
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
        print(f"MLflow run {self._run_id}: {where}", flush=True)

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
        print(f"warning: MLflow tracking lost ({_one_line(exc)}); training continues, "
              "later metrics are not logged", file=sys.stderr, flush=True)

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
