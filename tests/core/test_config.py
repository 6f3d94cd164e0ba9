"""autolog() settings: arguments over TRACEWIRE_* variables, clear errors naming the setting,
MLflow's production switches honoured, no network I/O on the caller's thread."""

from __future__ import annotations

import socket
import sys
import threading
import time
import types
from collections.abc import Iterator

import pytest

import tracewire
from tests.conftest import Traced
from tests.support.processes import in_private_mounts, run_command
from tracewire import config
from tracewire.config_settings import SETTINGS, markdown_table
from tracewire.export import destination
from tracewire.plugins.base import TracewireWrapper, WrappingPlugin
from tracewire.plugins.registry import PLUGINS


@pytest.mark.parametrize(
    "env,value,named",
    [
        ("TRACEWIRE_CAPTURE_CONTENT", "maybe", "TRACEWIRE_CAPTURE_CONTENT"),
        ("TRACEWIRE_STREAM_USAGE", "2", "TRACEWIRE_STREAM_USAGE"),
        ("TRACEWIRE_QUEUE_SIZE", "lots", "TRACEWIRE_QUEUE_SIZE"),
        ("TRACEWIRE_QUEUE_SIZE", "0", "TRACEWIRE_QUEUE_SIZE"),
        ("TRACEWIRE_FLUSH_TIMEOUT", "-1", "TRACEWIRE_FLUSH_TIMEOUT"),
        ("TRACEWIRE_TAGS", "novalue", "TRACEWIRE_TAGS"),
        ("TRACEWIRE_QUEUE_SIZE", "1.5", "TRACEWIRE_QUEUE_SIZE must be a whole number"),
        (
            "TRACEWIRE_INCLUDE",
            "openai,nosuchplugin",
            "TRACEWIRE_INCLUDE names unknown .*nosuchplugin",
        ),
        ("TRACEWIRE_EXCLUDE", "nosuchplugin", "TRACEWIRE_EXCLUDE names unknown .*nosuchplugin"),
        ("MLFLOW_EXPERIMENT_ID", "abc", "MLFLOW_EXPERIMENT_ID"),
        (
            "MLFLOW_TRACKING_URI",
            "htp://mlflow.internal:5000",
            "MLFLOW_TRACKING_URI is 'htp://mlflow.internal:5000', whose scheme 'htp' MLflow has no ",
        ),
        ("ENABLE_MLFLOW_TRACING", "perhaps", "ENABLE_MLFLOW_TRACING"),
        ("TRACEWIRE_FEEDBACK_PATH", "feedback", "TRACEWIRE_FEEDBACK_PATH"),
    ],
)
def test_invalid_environment_fails_at_autolog_naming_it(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(tracewire.ConfigError, match=named):
        tracewire.autolog()


def test_a_mistyped_tracking_uri_is_refused_without_its_credentials(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htps://user:s3cret@mlflow.internal/?token=t0k")
    with pytest.raises(tracewire.ConfigError, match="scheme 'htps'") as raised:
        tracewire.autolog()
    assert "s3cret" not in str(raised.value) and "t0k" not in str(raised.value)
    # What MLflow takes passes: a server, a database with its driver, a local folder.
    for uri in (
        "https://mlflow.internal",
        "postgresql+psycopg://db/mlflow",
        "file:///tmp/mlruns",
        tracking_uri,
    ):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        destination.check_destination(config.resolve())


def test_unusable_spool_dir_fails_at_autolog_naming_it(
    tracking_uri: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TRACEWIRE_SPOOL_DIR", str(blocker / "spool"))
    tracewire.disable()
    try:
        with pytest.raises(tracewire.ConfigError, match=r"TRACEWIRE_SPOOL_DIR .*writable"):
            tracewire.autolog()
    finally:
        tracewire.disable()


def _autolog_with_a_read_only_folder(folder, env: dict[str, str], cwd=None) -> str:
    """Run autolog() in a child whose `folder` is read-only, and return what it printed (its
    ConfigError). Root ignores file modes, so the folder is made read-only with a bind mount in a
    private mount namespace."""
    import os
    import shutil

    assert shutil.which("unshare") is not None and os.geteuid() == 0, (
        "this test remounts a folder read-only in a private mount namespace: it needs root"
    )
    script = (
        "import tracewire\ntry:\n    tracewire.autolog()\nexcept tracewire.ConfigError "
        "as error:\n    print(error)\n"
    )
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST_"))}
    child_env.update(env)
    mounts = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}"'
    if cwd:
        mounts += f' && cd "{cwd}"'
    done = run_command(
        in_private_mounts(mounts, [sys.executable, "-c", script]), child_env, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr[-2000:]


def test_a_local_store_in_a_read_only_place_fails_at_autolog_naming_it(tmp_path) -> None:
    """A read-only folder (a container's image, a mount) for the default sqlite store: a clear
    error when autolog() runs, not a shipper retrying for ever."""
    folder = tmp_path / "image"
    folder.mkdir()
    printed = _autolog_with_a_read_only_folder(
        folder, {"TRACEWIRE_SPOOL_DIR": str(tmp_path / "spool")}, cwd=folder
    )
    assert (
        f"MLflow's default tracking URI is 'sqlite:///{folder}/mlflow.db' (MLFLOW_TRACKING_URI "
        f"is not set), a local store that cannot be created: {folder} is not writable" in printed
    ), printed


def test_invalid_arguments_name_the_argument(tracking_uri: str) -> None:
    with pytest.raises(tracewire.ConfigError, match="argument capture_content"):
        tracewire.autolog(capture_content="yes please")  # type: ignore[arg-type]
    with pytest.raises(tracewire.ConfigError, match="argument tags"):
        tracewire.autolog(tags=["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(tracewire.ConfigError, match=r"argument exclude names unknown .*nope"):
        tracewire.autolog(exclude=["nope"])
    with pytest.raises(tracewire.ConfigError, match=r"argument include names unknown .*nope"):
        tracewire.autolog(include=["openai", "nope"])


def test_arguments_win_over_environment(traced: Traced, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEWIRE_CAPTURE_CONTENT", "false")
    tracewire.autolog(capture_content=True)
    assert config.active().capture_content is True
    tracewire.autolog()
    assert config.active().capture_content is False


def _openai_wrapped() -> bool:
    from openai.resources.chat.completions import Completions

    return isinstance(vars(Completions)["create"], TracewireWrapper)


def test_enable_mlflow_tracing_false_makes_autolog_a_no_op(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracewire.disable()
    monkeypatch.setenv("ENABLE_MLFLOW_TRACING", "false")
    tracewire.autolog()
    assert not _openai_wrapped()
    monkeypatch.setenv("ENABLE_MLFLOW_TRACING", "true")
    tracewire.autolog()
    try:
        assert _openai_wrapped()
    finally:
        tracewire.disable()


def test_tracewire_disable_mirrors_the_argument(
    traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _openai_wrapped()
    monkeypatch.setenv("TRACEWIRE_DISABLE", "true")
    tracewire.autolog()
    assert not _openai_wrapped()
    monkeypatch.setenv("TRACEWIRE_DISABLE", "nah")
    with pytest.raises(tracewire.ConfigError, match="TRACEWIRE_DISABLE"):
        tracewire.autolog()


def test_exclude_and_include(traced: Traced) -> None:
    tracewire.autolog(exclude=["openai"])
    assert not _openai_wrapped()
    tracewire.autolog(include=["openai"])
    assert _openai_wrapped()


@pytest.fixture
def missing_framework_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A registry entry whose framework is not installed."""
    module = types.ModuleType("tracewire_test_missing_plugin")

    class Missing(WrappingPlugin):
        name = "missingfw"
        module = "tracewire_no_such_framework"
        distribution = "tracewire-no-such-framework"
        extra = "missingfw"
        supported = ("1", "2")

        def targets(self) -> list:  # type: ignore[type-arg]
            return []

    module.Missing = Missing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(PLUGINS, "missingfw", f"{module.__name__}:Missing")
    yield "missingfw"


def test_missing_framework_named_in_include_is_an_error(
    traced: Traced, missing_framework_plugin: str
) -> None:
    with pytest.raises(tracewire.PluginUnavailable, match=r'pip install "tracewire\[missingfw\]"'):
        tracewire.autolog(include=[missing_framework_plugin])


def test_missing_framework_not_asked_for_is_skipped_silently(
    traced: Traced, missing_framework_plugin: str, caplog: pytest.LogCaptureFixture
) -> None:
    tracewire.autolog()
    assert _openai_wrapped()
    assert not [r for r in caplog.records if "missingfw" in r.getMessage()]


def test_autolog_does_no_network_io_on_the_callers_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracking server that accepts connections and never answers must not delay autolog()."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "never-looked-up-here")
    monkeypatch.setenv("TRACEWIRE_FLUSH_TIMEOUT", "0.5")
    try:
        started = time.monotonic()
        tracewire.autolog()
        assert time.monotonic() - started < 2.0
        assert not accepted  # not even a connection from the caller's thread
    finally:
        started = time.monotonic()
        tracewire.disable()
        assert time.monotonic() - started < 5.0  # bounded even with a hung store
        stop.set()
        thread.join()
        listener.close()
        for conn in accepted:
            conn.close()


def test_a_read_only_spool_directory_fails_at_autolog_naming_it(tmp_path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    printed = _autolog_with_a_read_only_folder(
        spool,
        {
            "TRACEWIRE_SPOOL_DIR": str(spool),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    )
    assert f"TRACEWIRE_SPOOL_DIR '{spool}' cannot hold tracewire's on-disk spool" in printed, (
        printed
    )


def test_the_settings_table_in_the_docs_is_the_declared_one() -> None:
    """Each setting is declared once (SETTINGS); the table a user reads is made from it."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    marker = "<!-- settings: generated from tracewire.config_settings.SETTINGS"
    pages = [
        p
        for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
        if marker in p.read_text()
    ]
    assert len(pages) == 1, pages
    text = pages[0].read_text()
    start = text.index("\n", text.index(marker)) + 1
    table = text[start : text.index("\n\n", start) + 1]
    assert table == markdown_table(), "regenerate it with config_settings.markdown_table()"


def test_autolog_arguments_and_settings_fields_are_the_declared_ones() -> None:
    import dataclasses
    import inspect

    declared = {s.field for s in SETTINGS if s.argument}
    assert set(inspect.signature(tracewire.autolog).parameters) == declared
    assert [f.name for f in dataclasses.fields(config.Settings)] == [
        s.field for s in SETTINGS if not s.switch
    ]
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)


def test_an_argument_wins_over_its_variable_and_tags_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEWIRE_SAMPLE_RATE", "0.5")
    monkeypatch.setenv("TRACEWIRE_TAGS", "team=search,tier=gold")
    monkeypatch.setenv("TRACEWIRE_ENVIRONMENT", "prod")
    settings = config.resolve(sample_rate=0.25, tags={"tier": "free"})
    assert settings.sample_rate == 0.25
    assert settings.trace_tags == {
        "deployment.environment": "prod",
        "team": "search",
        "tier": "free",
    }
    assert config.resolve().sample_rate == 0.5
    with pytest.raises(tracewire.ConfigError, match="argument sample_rate must be between"):
        config.resolve(sample_rate=2)
    with pytest.raises(TypeError, match="unknown setting"):
        config.resolve(sampel_rate=0.1)
