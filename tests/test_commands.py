"""Every shell command the READMEs and docs/ show runs as written.

The convention: a command a reader is meant to type sits in a fenced ``sh``
block of README.md, examples/README.md or a page of docs/, one command a line,
run from the repository root (a ``cd DIR`` line moves the lines after it in
its block).  Every other fenced block names a language that is not a shell.

Each command runs in a fresh temporary copy of the repository, with a venv
that sees this Python's packages first on ``PATH`` (so a ``pip install`` line
installs into the venv, never into this environment).  A comet.py installed
in this environment (``bash .ci/run`` installs one) is hidden from the
commands, as it would be absent from a reader's machine: a command must find
comet.py the way it says.  Then:

- a server -- a command naming its port (``--port N`` or ``127.0.0.1:N``), or
  ``python demo.py``, whose port is 8000 unless ``--port`` says otherwise --
  runs on a free port instead, and passes once that port answers an HTTP
  request (any status); then its process group is stopped;
- any other command passes when it exits with status 0.

Shown but not run (``NOT_RUN``): ``bash .ci/run``, the full test command --
it installs system packages and runs this whole suite, this test included.
"""
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from support import ROOT, need, wait_until

DOCUMENTS = ["README.md", os.path.join("examples", "README.md")] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
    if name.endswith(".md"))
NOT_RUN = {
    "bash .ci/run": "the full test command: it installs system packages and runs this suite",
}
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.M | re.S)
PORT = re.compile(r"(--port[ =]|127\.0\.0\.1:)(\d+)")
SHELL_LANGUAGES = {"sh", "bash", "shell", "console", "shell-session", "zsh", ""}
COPY_IGNORES = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.db", "*.db-wal",
                                      "*.db-shm", "*.sqlite3", "build", "dist", "*.egg-info",
                                      "_trial*", "_base")


def shown_commands():
    """``[(where, directory, command)]``: every command of every sh block, in order."""
    commands = []
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document), encoding="utf-8") as file:
            text = file.read()
        for fence in FENCE.finditer(text):
            if fence.group(1) != "sh":
                continue
            first_line = text.count("\n", 0, fence.start(2)) + 1
            directory = "."
            lines = fence.group(2).replace("\\\n", " ").splitlines()
            for number, line in enumerate(lines, first_line):
                command = line.strip()
                if not command or command.startswith("#"):
                    continue
                if command.startswith("cd "):
                    directory = os.path.normpath(os.path.join(directory, command[3:].strip()))
                    continue
                commands.append((f"{document}:{number}", directory, command))
    return commands


COMMANDS = shown_commands()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def on_a_free_port(command):
    """``(command, port)``: a server's command moved to a free port; port None for a one-shot."""
    if PORT.search(command):
        port = free_port()
        return PORT.sub(lambda match: match.group(1) + str(port), command), port
    if re.search(r"\bdemo\.py\b", command):
        port = free_port()
        return f"{command} --port {port}", port
    return command, None


def answers(port):
    """True once something answers HTTP on 127.0.0.1:port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True                          # any status: it answered
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """The environment the commands run in: a venv over this Python's packages first on
    PATH, and on PYTHONPATH a stand-in ``comet`` that refuses to be imported, which hides
    any comet.py installed here from a command that does not say where comet.py is."""
    need(importlib.util.find_spec("ensurepip") is not None, "python has no ensurepip for a venv")
    directory = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(directory)],
                   check=True, timeout=300)
    hidden = tmp_path_factory.mktemp("not-installed")
    (hidden / "comet.py").write_text(
        'raise ImportError("comet is not installed: the command must say where comet.py is")\n')
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONHOME", "COMET_STORE")}
    env["PATH"] = str(directory / "bin") + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(directory)
    env["PYTHONPATH"] = str(hidden)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture
def repository(tmp_path):
    """A fresh copy of the repository, as a reader's checkout would be."""
    copy = tmp_path / "repository"
    shutil.copytree(ROOT, copy, ignore=COPY_IGNORES)
    return copy


def test_the_readmes_show_the_demo_the_tests_and_every_example():
    shown = " ".join(command for _, _, command in COMMANDS)
    for expected in ("python demo.py", "bash .ci/run", "flask_app.py", "manage.py runserver",
                     "bottle_app.py", "deploy_app"):
        assert expected in shown, f"no command shows {expected}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_code_block_names_a_language_and_shell_is_sh(document):
    with open(os.path.join(ROOT, document), encoding="utf-8") as file:
        languages = [fence.group(1) for fence in FENCE.finditer(file.read())]
    assert all(languages), f"{document}: a fenced block without a language"
    assert not set(languages) & (SHELL_LANGUAGES - {"sh", ""}), \
        f"{document}: shell commands go in sh blocks, which tests/test_commands.py runs"


RUN = [(where, directory, command) for where, directory, command in COMMANDS
       if command not in NOT_RUN]


@pytest.mark.parametrize("where, directory, command", RUN,
                         ids=[f"{where} {command}" for where, _, command in RUN])
def test_the_command_runs_as_written(where, directory, command, environment, repository):
    command, port = on_a_free_port(command)
    cwd = repository / directory
    if port is None:
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=environment, timeout=600,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert done.returncode == 0, f"{where}: {command} exited {done.returncode}:\n{done.stdout}"
        return
    log = repository.parent / "server.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=environment, stdout=output,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    def up():
        assert server.poll() is None, "it exited"
        return answers(port)
    try:
        wait_until(up, timeout=90, interval=0.2)
    except AssertionError as failure:
        raise AssertionError(f"{where}: {command}: {failure}\n{log.read_text()}") from None
    finally:
        stop(server)


def stop(server):
    """Stop a server command's whole process group (its workers and reloaders too)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(15)
    try:
        os.killpg(server.pid, signal.SIGKILL)   # whatever of the group outlived its leader
    except ProcessLookupError:
        pass


def test_the_demo_on_a_busy_port_says_so_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--port", str(port)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(port) in lines[0] and "--port" in lines[0]
