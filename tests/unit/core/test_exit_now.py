"""`exit_now`: a command's process ends as a normal exit would, less the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import REPO, command_environment

SCRIPT = textwrap.dedent(
    """
    import atexit, logging, os, sys, threading, time
    from pathlib import Path

    from bloodcell.core.cli import exit_now

    out = Path(sys.argv[1])
    logging.basicConfig(filename=out / "command.log", level=logging.INFO)

    def late_writer():
        time.sleep(0.3)
        (out / "thread.txt").write_text("joined")

    class Teardown:
        def __init__(self, path):
            # the file and os.write now: open() and module globals may be gone when __del__ runs
            self.fd, self.write = os.open(path, os.O_WRONLY | os.O_CREAT), os.write

        def __del__(self):  # runs only when the interpreter frees its modules
            self.write(self.fd, b"freed")

    kept_until_teardown = Teardown(out / "teardown.txt")
    threading.Thread(target=late_writer).start()
    threading._register_atexit(lambda: (out / "threading_atexit.txt").write_text("ran"))
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
    logging.info("a line of the command's log")
    sys.stdout.write("left in the buffer, no newline")
    exit_now(3)
    """
)


def run_script(script: str, folder: Path) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python, writing into ``folder``."""
    return run_python("-c", script, str(folder))


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=command_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_everything_a_normal_exit_does_happens_except_freeing_the_interpreter(tmp_path):
    proc = run_script(SCRIPT, tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "left in the buffer, no newline"
    assert (tmp_path / "thread.txt").read_text() == "joined"  # a non-daemon thread was waited for
    assert (tmp_path / "threading_atexit.txt").read_text() == "ran"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "a line of the command's log" in (tmp_path / "command.log").read_text()
    # the teardown itself was skipped: that is the time saved
    assert (tmp_path / "teardown.txt").read_text() == ""


def test_the_same_script_without_it_does_free_the_interpreter(tmp_path):
    """The check above can fail: a normal exit runs the finalizer that exit_now skips."""
    proc = run_script(SCRIPT.replace("exit_now(3)", "sys.exit(3)"), tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert (tmp_path / "teardown.txt").read_text() == "freed"


def test_a_profiled_command_exits_the_usual_way_so_the_profile_is_written(tmp_path):
    """python -m cProfile writes its output after the code returns: exit_now leaves it that exit."""
    script = tmp_path / "command.py"
    script.write_text("from bloodcell.core.cli import exit_now\nexit_now(0)\n")
    profile = tmp_path / "command.prof"
    proc = run_python("-m", "cProfile", "-o", str(profile), str(script))
    assert proc.returncode == 0, proc.stderr
    assert profile.is_file() and profile.stat().st_size > 0
