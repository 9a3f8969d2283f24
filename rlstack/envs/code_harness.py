"""The test harness that runs inside the sandbox: one process per completion, one fork per test.

Standard library only, Python 3.8+ (it runs under the sandbox's interpreter, which may be the system's).
Written into the sandbox as harness.py next to solution.py and run as `python3 harness.py`.

Protocol. stdin carries length-prefixed messages (`<bytes>\\n<marshal, version 2>`): a header
{"mode": "assert" | "io", "n": N, "time_limit": s, "max_output": bytes}, then N tests, each read only
when it is due (so no later test's data is in memory while one runs): {"test": "assert f(2) == 4"} or
{"input": "1 2\\n"}. stdout carries one Python literal (a dict) per line: {"compiled": True} or
{"compile_error": "..."}, then per test {"i", "status", "error", "seconds"}, plus for io tests
{"digest", "head"}: the digest of the normalised output (expected outputs never enter the sandbox; the
caller compares digests). Status: "pass" | "fail" (AssertionError) | "error" (another exception, or an
exit before the test finished) | "ran" (io: ran to the end) | "timeout" | "output_limit" | "crash".

Only this process writes to stdout. Each test runs in a forked child in its own process group, with
stdin/stdout/stderr replaced (io: the test's input and a pipe back to us; assert: /dev/null) and every
other descriptor closed, under a per-test wall-clock limit (then the group is killed) and CPU limit. This
process is not dumpable, so a child cannot reopen our descriptors through /proc. A child reports on its
own pipe with a per-test nonce, after the test's statements ran: printing a fake result line, calling
exit() or os._exit(0), or swallowing the AssertionError elsewhere does not pass a test. What it cannot
stop: code that runs in the same process as the asserts may inspect the harness's frames (the nonce, the
test text) or return objects whose == is always true; io tests are immune to both.
"""

# ruff: noqa: SIM105  (try/except/pass: contextlib would be one more import on every start)
import _signal
import builtins
import marshal
import os
import resource
import select
import sys
import time

# Imported where needed, not here: the harness starts once per program, and json, signal, hashlib and ast
# each cost milliseconds (enum, re) on every start.

SOLUTION = "solution.py"
HEAD_CHARS = 200
ERROR_CHARS = 400


def normalize_output(text):
    """Whitespace-insensitive form of program output: runs of spaces/tabs collapsed, trailing blanks and
    leading/trailing empty lines dropped, CRLF = LF. Line structure is kept."""
    return "\n".join(" ".join(line.split()) for line in text.strip().splitlines())


def output_digest(text):
    import hashlib

    return hashlib.sha256(normalize_output(text).encode("utf-8", "replace")).hexdigest()


# ---- I/O with the caller ---------------------------------------------------------------------------------


def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise EOFError("stdin closed")
        data += chunk
    return data


def read_message():
    """One length-prefixed message, read unbuffered: nothing after it is read ahead."""
    size = b""
    while not size.endswith(b"\n"):
        size += read_exact(1)
        if len(size) > 20:
            raise ValueError("bad message framing")
    return marshal.loads(read_exact(int(size)))


def emit(obj):
    data = (repr(obj) + "\n").encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(1, data) :]


def describe(error, files=(SOLUTION,)):
    """`Type: message (file line N)`, the line being the innermost frame of the solution or the test."""
    try:
        message = str(error)
    except Exception:
        message = "<unprintable>"
    where = ""
    if isinstance(error, SyntaxError):
        where = f" (line {error.lineno})"
        message = error.msg
        if error.text:
            message += ": " + error.text.strip()[:100]
    else:
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename in files:
                where = f" ({tb.tb_frame.f_code.co_filename} line {tb.tb_lineno})"
            tb = tb.tb_next
    text = type(error).__name__ + (": " + message if message else "") + where
    return text[:ERROR_CHARS]


# ---- what the solution and the tests see ---------------------------------------------------------------


class Quitter:
    """`exit()` / `quit()`, which -S (no site module) leaves undefined; solutions use them."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Use {self.name}() to exit"

    def __call__(self, code=None):
        raise SystemExit(code)


PLAIN = frozenset((type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset))


def plain(value, _type=type, _plain=PLAIN, _dict=dict, _containers=(list, tuple, set, frozenset)):
    """Is `value` built only of builtin types (exactly: no subclasses)? Checks up to 100000 items."""
    stack, budget = [value], 100000
    while stack and budget:
        budget -= 1
        v = stack.pop()
        t = _type(v)
        if t not in _plain:
            return False
        if t is _dict:
            stack.extend(v.keys())
            stack.extend(v.values())
        elif t in _containers:
            stack.extend(v)
    return True


def strict_equal(left, right, _plain=plain):
    """`left == right`, except that a plain value (builtin types) never equals anything else: an object
    whose __eq__ always answers True (a known reward hack) does not pass `assert f(x) == 4`."""
    left_plain, right_plain = _plain(left), _plain(right)
    if left_plain != right_plain:
        return False
    return left == right


class StrictAsserts:
    """`assert a == b[, msg]` -> `assert __rlstack_equal__(a, b)[, msg]` anywhere in a test."""

    def __init__(self, ast):
        self.ast = ast

    def visit(self, tree):
        ast = self.ast
        for node in ast.walk(tree):
            test = getattr(node, "test", None)
            if (
                isinstance(node, ast.Assert)
                and isinstance(test, ast.Compare)
                and len(test.ops) == 1
                and isinstance(test.ops[0], ast.Eq)
            ):
                call = ast.Call(
                    ast.Name("__rlstack_equal__", ast.Load()), [test.left, test.comparators[0]], []
                )
                node.test = ast.copy_location(call, test)
        return tree


def compile_test(source, name):
    """A test as a function `__rlstack_test__(__rlstack_equal__)` (a local: the solution cannot replace
    it), its `==` asserts made strict. Line numbers stay those of the test's text."""
    import ast

    body = StrictAsserts(ast).visit(ast.parse(source, name)).body
    wrapper = ast.parse("def __rlstack_test__(__rlstack_equal__):\n    pass\n", name)
    wrapper.body[0].body = body or [ast.Pass()]
    return compile(ast.fix_missing_locations(wrapper), name, "exec", dont_inherit=True)


# ---- one test ------------------------------------------------------------------------------------------


def undumpable():
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    except (OSError, AttributeError):
        pass


def input_fd(text):
    data = text.encode()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("stdin")
    else:
        import tempfile

        fd, path = tempfile.mkstemp(dir=".")
        os.unlink(path)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def child(code, test_code, test_name, report_fd, out_fd, in_fd, time_limit, nonce):
    """In the forked child: isolate the descriptors, run the solution (then the asserts), report."""
    try:
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null if in_fd is None else in_fd, 0)
        os.dup2(null if out_fd is None else out_fd, 1)
        os.dup2(null, 2)
        top = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, top if top > 0 else 1024)
        _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        cpu = int(time_limit) + 1
        if hard != resource.RLIM_INFINITY:
            cpu = min(cpu, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, hard))
        module = type(sys)("__main__")
        module.__file__ = SOLUTION
        module.__builtins__ = builtins
        sys.modules["__main__"] = module
        sys.argv = [SOLUTION]
    except BaseException:
        os._exit(3)
    write, exit_now, equal = os.write, os._exit, strict_equal  # bound before the solution runs
    error = None
    try:
        exec(code, module.__dict__)
        if test_code is not None:
            scope = {}
            exec(test_code, module.__dict__, scope)
            scope["__rlstack_test__"](equal)
    except SystemExit as e:
        if test_code is not None or e.code not in (None, 0):
            error = f"SystemExit: {e.code!r}"
    except BaseException as e:
        error = describe(e, (SOLUTION, test_name))
    try:
        sys.stdout.flush()
    except BaseException as e:
        error = error or describe(e)
    write(report_fd, (nonce + "\n" + (error or "")).encode("utf-8", "backslashreplace"))
    exit_now(0)


def pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def collect(pid, report_r, out_r, deadline, max_output):
    """Read the child's report and output until it exits, the deadline passes or the output overflows."""
    buffers = {report_r: b"", out_r: b""}
    open_fds = {fd for fd in buffers if fd is not None}
    exit_fd = pidfd(pid)
    exited, status, outcome = False, None, None
    while outcome is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            outcome = "timeout"
            break
        watch = list(open_fds) + ([exit_fd] if exit_fd is not None else [])
        ready = select.select(watch, [], [], remaining if exit_fd is not None else min(remaining, 0.01))[0]
        if exit_fd is not None and exit_fd in ready:
            exited = True
        elif exit_fd is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            exited = done != 0
        for fd in open_fds.copy():
            if exited:
                os.set_blocking(fd, False)
            elif fd not in ready:
                continue
            while True:  # everything available now (all of it once the child has exited)
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    open_fds.discard(fd)
                    break
                buffers[fd] += chunk
                if fd == out_r and len(buffers[fd]) > max_output:
                    outcome = "output_limit"
                    break
                if not exited:
                    break
        if exited and outcome is None:
            outcome = "exited"
    for kill in (os.killpg, os.kill):  # the test's process group: also what it left running
        try:
            kill(pid, _signal.SIGKILL)
        except OSError:
            pass
    if status is None or not exited:
        status = os.waitpid(pid, 0)[1]
    if exit_fd is not None:
        os.close(exit_fd)
    return outcome, status, buffers[report_r], buffers[out_r]


def run_test(i, code, test, mode, time_limit, max_output):
    result = {"i": i, "status": "error", "error": None}
    test_name, test_code = f"<test {i}>", None
    if mode == "assert":
        try:
            test_code = compile_test(test["test"], test_name)
        except (SyntaxError, ValueError, RecursionError) as e:
            result["error"] = "the test does not compile: " + describe(e)
            return result
    nonce = os.urandom(8).hex()
    report_r, report_w = os.pipe()
    out_r = out_w = in_fd = None
    if mode == "io":
        out_r, out_w = os.pipe()
        in_fd = input_fd(test["input"])
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(code, test_code, test_name, report_w, out_w, in_fd, time_limit, nonce)
    for fd in (report_w, out_w, in_fd):
        if fd is not None:
            os.close(fd)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    outcome, status, report, output = collect(pid, report_r, out_r, start + time_limit, max_output)
    result["seconds"] = round(time.monotonic() - start, 4)
    for fd in (report_r, out_r):
        if fd is not None:
            os.close(fd)
    reported, _, reported_error = report.decode("utf-8", "replace").partition("\n")
    report = {"error": reported_error or None} if reported == nonce else None
    signalled = os.WIFSIGNALED(status)
    if outcome == "timeout" or (signalled and os.WTERMSIG(status) == _signal.SIGXCPU):
        result.update(status="timeout", error=f"time limit exceeded ({time_limit:g} s)")
    elif outcome == "output_limit":
        result.update(status="output_limit", error=f"output over {max_output} bytes")
    elif signalled:
        import signal

        result.update(status="crash", error=f"killed by {signal.Signals(os.WTERMSIG(status)).name}")
    elif report is not None and report["error"]:
        failed = str(report["error"]).startswith("AssertionError")
        result.update(status="fail" if failed else "error", error=str(report["error"])[:ERROR_CHARS])
    elif report is None and (mode == "assert" or os.WEXITSTATUS(status) != 0):
        result["error"] = f"exited with code {os.WEXITSTATUS(status)} before the test finished"
    elif mode == "assert":
        result["status"] = "pass"
    else:
        text = output.decode("utf-8", "replace")
        result.update(status="ran", digest=output_digest(text), head=text[:HEAD_CHARS])
    return result


def main():
    undumpable()
    if not hasattr(builtins, "exit"):
        builtins.exit, builtins.quit = Quitter("exit"), Quitter("quit")
    header = read_message()
    mode, n = header["mode"], int(header["n"])
    try:
        with open(SOLUTION, "rb") as f:
            code = compile(f.read(), SOLUTION, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as e:
        emit({"compile_error": describe(e)})
        return
    emit({"compiled": True})
    for i in range(n):
        emit(run_test(i, code, read_message(), mode, float(header["time_limit"]), int(header["max_output"])))


if __name__ == "__main__":
    main()
