"""`tracewire run -- <command>`: tracing on in every Python process of a command whose code
never imports tracewire, spawned workers included; the store initialized once, up front."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest

from tests.conftest import API_KEY
from tests.support.mlflow_server import free_port
from tests.support.model_serving import ModelServer, log_models
from tests.support.processes import (
    TRACEWIRE_RUN,
    clean_env,
    processes_with_env,
    run_command,
    start_under_tracewire_run,
    stop_group,
    uvicorn_workers,
    wait_answering,
)
from tracewire.testing import OpenAIServer


def _env(tmp_path: Path, openai_server: OpenAIServer, **extra: str) -> dict[str, str]:
    return clean_env(
        **{
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
            "MLFLOW_EXPERIMENT_NAME": "zero-code",
            "MLFLOW_MODEL_CATALOG_URI": "",
            "TRACEWIRE_SPOOL_DIR": str(tmp_path / "spool"),
            "OPENAI_BASE_URL": openai_server.base_url,
            "OPENAI_API_KEY": API_KEY,
            **extra,
        }
    )


def _traces(env: dict[str, str], expected: int) -> list[mlflow.entities.Trace]:
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 30
    while True:
        experiment = client.get_experiment_by_name("zero-code")
        found = (
            client.search_traces(locations=[experiment.experiment_id], max_results=500)
            if experiment
            else []
        )
        if len(found) >= expected or time.monotonic() > deadline:
            assert len(found) == expected, [t.info.trace_id for t in found]
            return found
        time.sleep(0.2)


SCRIPT = """
import openai, os, sys
client = openai.OpenAI(max_retries=0)
reply = client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "zero code"}])
print(reply.choices[0].message.content, "traced" if "tracewire" in sys.modules else "untraced")
"""


def test_a_script_that_never_imports_tracewire_is_traced(
    tmp_path: Path, openai_server: OpenAIServer
) -> None:
    # A sitecustomize of the user's own, further down the path, still runs.
    own = tmp_path / "own-site"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITE_RAN'] = 'yes'\n")
    env = _env(tmp_path, openai_server, PYTHONPATH=str(own))
    (tmp_path / "script.py").write_text(SCRIPT + "print(os.environ.get('OWN_SITE_RAN'))\n")
    done = run_command([*TRACEWIRE_RUN, sys.executable, str(tmp_path / "script.py")], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Echo:", "zero", "code", "traced", "yes"]
    (trace,) = _traces(env, 1)
    assert trace.data.spans[0].name == "chat gpt-4o-mini"


def test_the_commands_exit_code_and_a_bad_setting_fail_clearly(
    tmp_path: Path, openai_server: OpenAIServer
) -> None:
    env = _env(tmp_path, openai_server)
    failed = run_command([*TRACEWIRE_RUN, sys.executable, "-c", "raise SystemExit(7)"], env)
    assert failed.returncode == 7
    bad = run_command(
        [*TRACEWIRE_RUN, sys.executable, "-c", "pass"], {**env, "TRACEWIRE_SAMPLE_RATE": "lots"}
    )
    assert bad.returncode == 1 and "TRACEWIRE_SAMPLE_RATE" in bad.stderr
    mistyped = run_command(
        [*TRACEWIRE_RUN, sys.executable, "-c", "print('ran')"],
        {**env, "MLFLOW_TRACKING_URI": "htp://mlflow.internal:5000"},
    )
    assert (mistyped.returncode, mistyped.stdout) == (1, ""), mistyped.stderr
    assert mistyped.stderr.splitlines() == [
        "tracewire: error: MLFLOW_TRACKING_URI is 'htp://mlflow.internal:5000', whose scheme "
        "'htp' MLflow has no tracking store for: use http:// or https:// for a tracking server, "
        "sqlite:/// (or postgresql://, mysql://, mssql://) for a database, or databricks."
    ]
    missing = run_command([*TRACEWIRE_RUN, "no-such-command-here"], env)
    assert missing.returncode == 1 and "command not found" in missing.stderr


def test_a_bad_setting_in_a_process_tracewire_run_did_not_check_leaves_it_untraced(
    tmp_path: Path, openai_server: OpenAIServer
) -> None:
    """A process that inherits the bootstrap (a worker started later, a changed variable) but
    whose settings are bad still runs, untraced, with one line saying why."""
    import tracewire.bootstrap

    env = _env(
        tmp_path,
        openai_server,
        TRACEWIRE_RUN="1",
        PYTHONPATH=str(Path(tracewire.bootstrap.__file__).parent),
        MLFLOW_TRACKING_URI="htp://mlflow.internal:5000",
    )
    done = run_command([sys.executable, "-c", "print('app ran')"], env)
    assert (done.returncode, done.stdout) == (0, "app ran\n"), done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        "tracewire: autolog() failed, this process runs untraced: "
        "MLFLOW_TRACKING_URI is 'htp://mlflow.internal:5000'"
    ), line


# Read, not imported: its OpenAI client wants the key the test gives the workers.
APP = (Path(__file__).parents[1] / "support" / "worker_app.py").read_text()


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    stat = (Path("/proc") / str(pid) / "stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_two_workers_each_trace(tmp_path: Path, openai_server: OpenAIServer, server: str) -> None:
    """uvicorn spawns its workers (a fresh interpreter each); gunicorn forks them."""
    (tmp_path / "zero_app.py").write_text(APP)
    # The workers stop on SIGTERM with the bounded exit flush; on a loaded machine the default
    # 2 s may leave the last trace spooled for the next process, which this test does not run.
    env = _env(tmp_path, openai_server, TRACEWIRE_FLUSH_TIMEOUT="10")
    port = free_port()
    command = {
        "uvicorn": uvicorn_workers("zero_app:app", port),
        "gunicorn": [
            "-m",
            "gunicorn",
            "zero_app:app",
            "-k",
            "uvicorn.workers.UvicornWorker",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
        ],
    }[server]
    proc = start_under_tracewire_run(command, tmp_path, env)
    url = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    asked = 0
    try:
        wait_answering(url)
        # A shipper for each process that can trace, none for multiprocessing's resource
        # tracker (it runs no app code; tracing it cost a shipper and 170 MB of its own).
        shippers = [
            pid
            for pid in processes_with_env("TRACEWIRE_SPOOL_DIR", env["TRACEWIRE_SPOOL_DIR"])
            if "tracewire.export.shipper" in _cmdline(pid)
        ]
        assert len(shippers) >= 2
        parents = [_cmdline(_parent(pid)) for pid in shippers]
        assert not [c for c in parents if "resource_tracker" in c], parents
        # New connections until both workers have answered (the kernel spreads them).
        deadline = time.monotonic() + 60
        while len(pids) < 2 and asked < 200 and time.monotonic() < deadline:
            asked += 1
            response = httpx.get(
                f"{url}/ask",
                params={"q": f"question {asked}"},
                headers={"Connection": "close"},
                timeout=30,
            )
            pids.add(response.json()["pid"])
    finally:
        output = stop_group(proc)
    assert len(pids) == 2, f"one worker answered all {asked} requests\n{output}"
    traces = _traces(env, asked)
    questions = []
    for trace in traces:  # each a web request (the starlette plugin) with its model call
        by_name = {s.name: s for s in trace.data.spans}
        assert by_name["chat gpt-4o-mini"].parent_id == by_name["GET /ask"].span_id
        questions.append(by_name["chat gpt-4o-mini"].inputs["messages"][0]["content"])
    assert sorted(questions) == sorted(f"question {i}" for i in range(1, asked + 1))


AGENT = """
import openai
import mlflow
from mlflow.pyfunc import PythonModel


class Agent(PythonModel):
    def predict(self, context, model_input, params=None):
        client = openai.OpenAI(max_retries=0)
        return [client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": question}]
        ).choices[0].message.content for question in model_input["question"]]


mlflow.models.set_model(Agent())
"""


@pytest.mark.timeout(240)
def test_sigterm_right_after_a_burst_under_mlflow_models_serve_stores_every_trace(
    tmp_path: Path, openai_server: OpenAIServer
) -> None:
    """A container's stop: SIGTERM to its first process, ``tracewire run`` running ``mlflow
    models serve`` (whose CLI runs uvicorn as a child), right after a burst of requests. When
    that first process exits, the container and its disk are gone: every trace must be in the
    store by then."""
    env = _env(tmp_path, openai_server)
    (tmp_path / "agent.py").write_text(AGENT)
    model_id = log_models(env, tmp_path, {"agent": "agent.py"}, pip_requirements=["openai"])[
        "agent"
    ]
    server = ModelServer(model_id, env, tmp_path, wrapper=TRACEWIRE_RUN).start()
    proc = server.proc
    assert proc is not None
    calls = 50
    try:
        server.wait_ready()
        with httpx.Client(timeout=30) as client:
            for i in range(calls):
                answer = client.post(
                    f"{server.url}/invocations",
                    json={
                        "dataframe_split": {"columns": ["question"], "data": [[f"question {i}"]]}
                    },
                )
                assert answer.status_code == 200, answer.text
        proc.send_signal(signal.SIGTERM)  # to the first process only, as `docker stop` does
        started = time.monotonic()
        proc.wait(timeout=90)
        stopped_after = time.monotonic() - started
        # The container is gone now: whatever is not stored is lost with it.
        stored = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_traces(
            locations=[
                mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
                .get_experiment_by_name("zero-code")
                .experiment_id
            ],
            max_results=500,
        )
    finally:
        server.signal_group(signal.SIGKILL)  # what the container's end does to the rest
        proc.wait()
        output = server.output()
    print(
        f"\nmodels serve: stopped {stopped_after:.1f} s after SIGTERM, {len(stored)} of "
        f"{calls} traces stored by then"
    )
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), output[-4000:]
    questions = sorted(
        s.inputs["messages"][0]["content"]
        for t in stored
        for s in t.data.spans
        if s.name == "chat gpt-4o-mini"
    )
    assert questions == sorted(f"question {i}" for i in range(calls)), output[-4000:]


def _process_tree(root: int) -> str:
    """``ps`` lines of ``root`` and its descendants: state, kernel wait channel, age, command."""
    lines = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid=,stat=,wchan:24=,etime=,args="],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    tree, found = {root}, []
    for line in lines:  # parents are listed before their children
        pid, ppid = (int(field) for field in line.split()[:2])
        if pid in tree or ppid in tree:
            tree.add(pid)
            found.append(line)
    return "\n".join(found)


def test_signals_sent_to_tracewire_run_reach_the_command(
    tmp_path: Path, openai_server: OpenAIServer
) -> None:
    """`docker stop` with STOPSIGNAL SIGINT, `timeout -s INT`, systemd: a SIGINT sent to the
    first process only (no terminal here) is passed on to the command, which ends as it would."""
    env = _env(tmp_path, openai_server)
    (tmp_path / "wait.py").write_text(
        SCRIPT + "import time\nprint('waiting', flush=True)\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen(
        # SIGINT at its default, as a service manager starts a command: a test run launched as a
        # background job of a shell ignores it, and the command would inherit that (and sleep on).
        ["env", "--default-signal=INT", *TRACEWIRE_RUN, sys.executable, "wait.py"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split()[-1] == "traced"
        assert proc.stdout.readline().strip() == "waiting"
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a hang guard: say where everything stands
            tree = _process_tree(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"running 60 s after SIGINT:\n{tree}\nstdout: {out}\nstderr: {err}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGINT  # the command died of it, and so did its parent
    _traces(env, 1)  # and its trace was stored on the way out
