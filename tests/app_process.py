"""Runs an app as the tests' users do, each run a fresh process, without paying TensorFlow's
import for every run.

An app start here spends ~8 CPU s importing TensorFlow before it reads a flag, and the suite
starts the apps about a hundred times. `run_app` forks each run from a server process that
has imported TensorFlow, Keras and keras_vit once (multiprocessing's forkserver, one per pytest
worker) but has run no TensorFlow op, so the child starts the runtime itself as a new process
does. The child gets the run's environment, working directory and argv, runs the app file as
__main__ (absl parses the flags, the app calls sys.exit), and its stdout/stderr, exit status
and CPU seconds come back as from subprocess.run.

What a fork cannot show stays on real subprocesses: TensorFlow's start-up log lines (the
quiet-logs tests), signals sent to a running app, multi-worker clusters, and the README's
commands as typed. KERAS_VIT_TEST_FORK=0 runs every app in a new interpreter instead."""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_context = None
# CPU seconds of the forked runs that have ended in this process (conftest.py adds them to
# each test's CPU time: forked runs are the server's children, not this process's).
forked_cpu_seconds = 0.0


def _forkserver():
    global _context
    if _context is None:
        import multiprocessing
        import multiprocessing.forkserver

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["app_preload"])
        # The server imports its preload before it applies our sys.path (Python 3.11), so
        # tests/ reaches it through PYTHONPATH, set while it starts.
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.dirname(os.path.abspath(__file__)), saved) if p)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        _context = context
    return _context


def _run_in_child(path, args, env, cwd, out_path, err_path, cpu_path, code=None):
    """The forked child: becomes `python PATH ARGS...` (or `python -c CODE ARGS...`) in ENV
    and CWD."""
    import atexit
    import resource
    import runpy

    preloaded = "tensorflow" in sys.modules

    for fd, name in ((1, out_path), (2, err_path)):  # appended: both may be one file
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [path, *args]
    program, code = code, 0
    try:
        if program is None:
            runpy.run_path(path, run_name="__main__")
        else:
            exec(compile(program, "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:  # as the interpreter turns sys.exit's argument into a status
        if isinstance(e.code, int):
            code = e.code
        elif e.code is not None:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # an uncaught exception: traceback on stderr, status 1
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter runs at exit (file writers, absl)
    sys.stdout.flush()
    sys.stderr.flush()
    # The app's stderr filter (apps/common.py) is its child and writes until it reads EOF:
    # close our ends and wait for it, so that the captured stderr is complete.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    with open(cpu_path, "w") as f:
        f.write(f"{sum(u.ru_utime + u.ru_stime for u in usage)} {int(preloaded)}")
    os._exit(code)


def _forking():
    return os.environ.get("KERAS_VIT_TEST_FORK", "1") != "0"


class _NewInterpreter:
    """`python PATH ARGS` as subprocess.Popen, with multiprocessing.Process's names."""

    def __init__(self, path, args, env, cwd, out_path, err_path, code=None):
        command = [path, *args] if code is None else ["-c", code, *args]
        with open(out_path, "ab") as out, open(err_path, "ab") as err:
            self._proc = subprocess.Popen([sys.executable, *command], env=env, cwd=cwd,
                                          stdout=out, stderr=err)
        self.pid = self._proc.pid

    @property
    def exitcode(self):
        return self._proc.poll()

    def join(self, timeout=None):
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self):
        self._proc.kill()


def _start(app, args, env, cwd, out_path, err_path, cpu_path, code=None):
    path = "-c" if code is not None else app if os.path.isabs(app) else os.path.join(ROOT, "apps", app)
    env = dict(os.environ if env is None else env)
    for name in {out_path, err_path}:
        open(name, "w").close()
    if not _forking():
        return path, _NewInterpreter(path, args, env, cwd, out_path, err_path, code)
    child = _forkserver().Process(target=_run_in_child,
                                  args=(path, list(args), env, cwd, out_path, err_path, cpu_path,
                                        code))
    child.start()
    return path, child


def _count_cpu(cpu_path):
    """Adds a finished run's CPU seconds to forked_cpu_seconds (none from a killed run)."""
    global forked_cpu_seconds
    if os.path.exists(cpu_path):
        with open(cpu_path) as f:
            seconds, preloaded = f.read().split()
        os.remove(cpu_path)
        forked_cpu_seconds += float(seconds)
        if preloaded != "1":  # the server's import failed: every run would pay it again
            raise RuntimeError("tests/app_preload.py did not load in the fork server; "
                               "run `python tests/app_preload.py` to see why")


def run_app(app, *args, env=None, cwd=ROOT, timeout=600, code=None):
    """subprocess.run([python, apps/APP, *args], capture_output=True, text=True, env=env,
    cwd=cwd, timeout=timeout), with the run forked from the pre-imported server; APP may be
    any script's absolute path. With CODE: `python -c CODE *args`."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err, cpu = (os.path.join(tmp, n) for n in ("out", "err", "cpu"))
        path, child = _start(app, args, env, cwd, out, err, cpu, code)
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired([path, *args], timeout)
        _count_cpu(cpu)
        with open(out, errors="replace") as f_out, open(err, errors="replace") as f_err:
            stdout, stderr = f_out.read(), f_err.read()
    command = [path, *args] if code is None else ["-c", code, *args]
    return subprocess.CompletedProcess([sys.executable, *command], child.exitcode, stdout,
                                       stderr)


class AppProcess:
    """An app running in the background, forked from the server, as subprocess.Popen gives
    it (pid, poll, wait, send_signal, kill, returncode), stdout and stderr into one log."""

    def __init__(self, app, args, log_path, env=None, cwd=ROOT):
        self.log_path = str(log_path)
        self._cpu_path = self.log_path + ".cpu"
        self.args, self._child = _start(app, args, env, cwd, self.log_path, self.log_path,
                                        self._cpu_path)
        self.pid = self._child.pid

    @property
    def returncode(self):
        return self._child.exitcode

    def poll(self):
        if self._child.exitcode is not None:
            _count_cpu(self._cpu_path)
        return self._child.exitcode

    def wait(self, timeout=None):
        self._child.join(timeout)
        if self._child.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def kill(self):
        self._child.kill()
