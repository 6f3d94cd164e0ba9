"""Every setting of tracewire, declared once (:data:`SETTINGS`): its ``autolog()`` argument, its
environment variable, its parser (config_parsers.py), its default and its one line of doc. The
docs' settings table is :func:`markdown_table`; a test keeps the two equal. What reads the
declarations into a ``Settings`` object is config.py.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracewire import config_parsers as parsers

# Chat-completion streams to these hosts are asked for `stream_options.include_usage`: every
# host ("*"). A host that rejects the argument is remembered for the process (plugins/openai.py).
DEFAULT_STREAM_USAGE_HOSTS = ("*",)


def default_spool_dir() -> Path:
    """$XDG_CACHE_HOME/tracewire/spool (or ~/.cache/...), else, if home is not writable
    (read-only containers), a directory of this user's own in the temp dir: one level, so that
    the spool's checks (ownership, mode) cover every directory another user could make there."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if os.access(cache, os.W_OK) or (
        not os.path.exists(cache) and os.access(os.path.dirname(cache), os.W_OK)
    ):
        return Path(cache) / "tracewire" / "spool"
    return Path(tempfile.gettempdir()) / f"tracewire-{os.geteuid()}"


@dataclass(frozen=True)
class Setting:
    """One setting: where it is read from, how, its default, and its row in the docs' table.
    An ``argument`` is also an ``autolog()`` keyword of the same name, and wins over ``env``."""

    field: str  # the Settings attribute (and the argument's name)
    env: str
    parse: Callable[[str, Any], Any]  # (the name the user set, raw value) -> value
    default: Any  # a zero-argument callable: computed when read
    doc: str
    argument: bool = False
    shown_default: str | None = None  # the table's default column, when not the default
    env_note: str = ""  # after the variable in the table: its form
    # Both apply, the argument's keys over the variable's (tags).
    merge: Callable[[Any, Any], Any] | None = None
    switch: bool = False  # read by autolog() itself, not a field of Settings

    def row(self) -> str:
        default = self.shown_default
        if default is None:
            value = self.default
            default = (
                "none"
                if value in (None, (), {})
                else f"`{str(value).lower()}`"
                if isinstance(value, bool)
                else f"`{value:g}`"
                if isinstance(value, float)
                else f"`{value}`"
            )
        argument = f" `{self.field}`" if self.argument else ""
        note = f" ({self.env_note})" if self.env_note else ""
        return f"|{argument} | `{self.env}`{note} | {default} | {self.doc} |"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "include",
        "TRACEWIRE_INCLUDE",
        parsers.plugins,
        None,
        "plugins to enable (`openai`, "
        "`langchain`, `langgraph`, `starlette`, `mlflow_agent`); naming one whose framework "
        "is missing raises `PluginUnavailable` with the pip extra",
        argument=True,
        shown_default="all installed",
    ),
    Setting(
        "exclude", "TRACEWIRE_EXCLUDE", parsers.plugins, (), "plugins to leave alone", argument=True
    ),
    Setting(
        "capture_content",
        "TRACEWIRE_CAPTURE_CONTENT",
        parsers.boolean,
        True,
        "`false`: no prompt, "
        "completion or tool text is recorded anywhere; model, token usage and finish "
        "reasons still are",
        argument=True,
    ),
    Setting(
        "tags",
        "TRACEWIRE_TAGS",
        parsers.tags,
        {},
        "tags on every trace (the argument's over the variable's)",
        argument=True,
        env_note="`k=v,k2=v2`",
        merge=lambda env, arg: {**env, **arg},
    ),
    Setting(
        "redact",
        "TRACEWIRE_REDACT",
        parsers.redact,
        None,
        "`redact(key, value) -> value`, "
        'called for every span\'s `"inputs"` and `"outputs"` on the background worker, '
        "before anything touches disk; if it raises, that content is withheld",
        argument=True,
        env_note="`package.module:function`",
    ),
    Setting(
        "stream_usage",
        "TRACEWIRE_STREAM_USAGE",
        parsers.boolean,
        True,
        "ask chat streams for usage (see [Streams](traces.md#streams)); `false`: ask no host",
        argument=True,
    ),
    Setting(
        "stream_usage_hosts",
        "TRACEWIRE_STREAM_USAGE_HOSTS",
        parsers.hosts,
        DEFAULT_STREAM_USAGE_HOSTS,
        "which hosts chat streams ask for usage, "
        "comma-separated: `api.example.com`, `.example.com` (its subdomains), `*` (every "
        "host), `!host` (never that host; with only `!` entries, every other host is "
        "asked), or `none`. Host names only, no scheme or port. Replaces the default: "
        "`vllm.internal` asks that host alone",
        shown_default="`*` (every host)",
    ),
    Setting(
        "environment",
        "TRACEWIRE_ENVIRONMENT",
        parsers.optional_text,
        None,
        "trace tag `deployment.environment`",
    ),
    Setting(
        "app_version",
        "TRACEWIRE_APP_VERSION",
        parsers.optional_text,
        None,
        "trace tag `service.version`",
    ),
    Setting("region", "TRACEWIRE_REGION", parsers.optional_text, None, "trace tag `cloud.region`"),
    Setting(
        "sample_rate",
        "TRACEWIRE_SAMPLE_RATE",
        parsers.number_in(float, 0.0, 1.0),
        1.0,
        "share of sessions to keep, 0 to 1 (see [Sampling](#sampling))",
        argument=True,
        shown_default="`1`",
    ),
    Setting(
        "queue_size",
        "TRACEWIRE_QUEUE_SIZE",
        parsers.number_in(int, 1),
        10_000,
        "finished traces held in memory before the worker spools them",
    ),
    Setting(
        "spool_dir",
        "TRACEWIRE_SPOOL_DIR",
        parsers.spool_dir,
        default_spool_dir,
        "where the on-disk spool lives: a directory of this user's, made (or tightened to) "
        "0700; one of another user is refused at `autolog()` (see "
        "[Security](security.md#where-prompts-rest-on-disk))",
        shown_default="`~/.cache/tracewire/spool` (`$TMPDIR/tracewire-<uid>` if home is read-only)",
    ),
    Setting(
        "spool_max_bytes",
        "TRACEWIRE_SPOOL_MAX_MB",
        parsers.number_in(float, 0.001, scale=2**20),
        512 * 2**20,
        "spool size budget per process, in MB; past it new traces are dropped and counted",
        shown_default="`512`",
    ),
    Setting(
        "feedback_retention",
        "TRACEWIRE_FEEDBACK_RETENTION",
        parsers.number_in(float, 0),
        86_400.0,
        "seconds feedback waits for its trace before it is dropped (and counted)",
    ),
    Setting(
        "feedback_max_pending",
        "TRACEWIRE_FEEDBACK_MAX_PENDING",
        parsers.number_in(int, 1),
        1000,
        "feedback entries waiting for their trace, per process; past it (or "
        "`TRACEWIRE_FEEDBACK_MAX_PENDING_MB`) the oldest waiting one is dropped (counted)",
    ),
    Setting(
        "feedback_max_pending_bytes",
        "TRACEWIRE_FEEDBACK_MAX_PENDING_MB",
        parsers.number_in(float, 0.001, scale=2**20),
        2**20,
        "MB of feedback waiting for its trace, per process",
        shown_default="`1`",
    ),
    Setting(
        "feedback_path",
        "TRACEWIRE_FEEDBACK_PATH",
        parsers.feedback_path,
        None,
        "the feedback route (`/feedback`) of the `TracingMiddleware` the `starlette` "
        "plugin installs",
    ),
    Setting(
        "trust_identity_headers",
        "TRACEWIRE_TRUST_IDENTITY_HEADERS",
        parsers.identity_headers,
        {},
        "headers that name the session and user for the `TracingMiddleware` the "
        "`starlette` plugin installs (`session=X-Session-ID,user=X-User-ID`): only behind "
        "a gateway that sets them",
    ),
    Setting(
        "session_cookie_key",
        "TRACEWIRE_SESSION_COOKIE_KEY",
        parsers.optional_text,
        None,
        "the key of the keyed hash that turns a session cookie into a session id, when "
        "`TracingMiddleware(session_cookie=...)` is not given `session_cookie_key`: the "
        "same in every worker",
    ),
    Setting(
        "prices",
        "TRACEWIRE_PRICES",
        parsers.prices,
        {},
        "USD per token by model name "
        "(`input`, `output`, optional `cache_read_input`), for private or fine-tuned "
        "models; wins over MLflow's catalog (see [Cost](delta-and-stats.md#cost))",
        argument=True,
        env_note="a `.json` or `.toml` file",
    ),
    Setting(
        "delta_path",
        "TRACEWIRE_DELTA_PATH",
        parsers.delta_path,
        None,
        "sync the experiment's "
        "traces into this Delta table from a background thread (needs `tracewire[delta]`)",
        argument=True,
    ),
    Setting(
        "delta_interval",
        "TRACEWIRE_DELTA_INTERVAL",
        parsers.number_in(float, 1.0),
        300.0,
        "seconds between background Delta syncs (at least 1)",
        argument=True,
    ),
    Setting(
        "ship_timeout",
        "TRACEWIRE_SHIP_TIMEOUT",
        parsers.number_in(float, 0.1),
        10.0,
        "seconds one store request may take before the shipper backs off and retries",
    ),
    Setting(
        "flush_timeout",
        "TRACEWIRE_FLUSH_TIMEOUT",
        parsers.number_in(float, 0),
        2.0,
        "seconds exit, `disable()` and `flush()` keep waiting on a store that makes no "
        "progress (down, hung, refusing); the rest stays spooled",
    ),
    Setting(
        "exit_timeout",
        "TRACEWIRE_EXIT_TIMEOUT",
        parsers.number_in(float, 0),
        30.0,
        "seconds exit, `disable()` and `flush()` wait at most while the store does make "
        "progress (match it to your platform's stop grace period)",
    ),
    Setting(
        "trace_timeout",
        "TRACEWIRE_TRACE_TIMEOUT",
        parsers.number_in(float, 1.0),
        3600.0,
        "seconds a trace may stay open (a stream nobody closes, a task that never ends); "
        "then it is stored as it is, its root failed and its open spans marked "
        "`tracewire.abandoned`, and `tracewire spool status` counts it. At least 1",
    ),
    Setting(
        "disable",
        "TRACEWIRE_DISABLE",
        parsers.boolean,
        False,
        "`True`: same as `tracewire.disable()`",
        argument=True,
        switch=True,
    ),
    Setting(
        "enable_mlflow_tracing",
        "ENABLE_MLFLOW_TRACING",
        parsers.boolean,
        True,
        "`false` makes `autolog()` a no-op (MLflow's production switch)",
        switch=True,
    ),
    Setting(
        "tracking_uri",
        "MLFLOW_TRACKING_URI",
        parsers.optional_text,
        None,
        "where traces go; a "
        "scheme MLflow has no store for (a mistyped `htp://`) fails at `autolog()`",
        shown_default="`sqlite:///mlflow.db`",
    ),
    Setting(
        "experiment_id",
        "MLFLOW_EXPERIMENT_ID",
        parsers.experiment_id,
        None,
        "which experiment, by id",
        shown_default="`Default`",
    ),
    Setting(
        "experiment_name",
        "MLFLOW_EXPERIMENT_NAME",
        parsers.optional_text,
        None,
        "which experiment, by name (created if missing)",
        shown_default="`Default`",
    ),
)


def markdown_table() -> str:
    """The docs' settings table."""
    head = "| argument | environment variable | default | meaning |\n|---|---|---|---|\n"
    return head + "\n".join(s.row() for s in SETTINGS) + "\n"
