r"""
A hard time limit for math-verify, also off the main thread: the symbolic check runs in a worker process.

Why a worker process: math-verify's own timeout uses `signal.alarm`, which raises `ValueError` off the main thread
(TRL's `accuracy_reward` then simply disables it) and cannot interrupt a long C-level computation even on the main
thread. A sympy expression like `9^{9^{9}}` keeps `verify` busy for minutes. A process can always be killed, so the
parent waits at most `timeout_seconds` per completion (on a monotonic clock, with `select`) and then kills the worker
and starts a replacement at once, in the background. The worker is started once per training process and reused
(a spawn costs about a second of imports; a round trip costs well under a millisecond), it is shared by all reward
instances and threads (requests are serialized by a lock), and it also arms its own interval timer slightly before the
deadline, so a merely slow Python-level computation is interrupted cooperatively and the worker survives. The worker
is started with `subprocess` (`fork`+`exec`), not `multiprocessing`, so it neither forks a CUDA/threaded trainer nor
re-imports the user's `__main__`, and it loads this module without the package `__init__` (which imports torch/TRL).
"""

import atexit
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any


logger = logging.getLogger(__name__)

_WORKER_MEMORY_LIMIT = 8 << 30  # bytes of address space; the worker peaks near 0.2 GiB


class SoftTimeout(BaseException):
    # A BaseException so that math-verify's and sympy's `except Exception` handlers do not swallow it.
    pass


_EXTRACTION_CONFIG = None
_MATH_DELIMITER = re.compile(r"(?<!\\)\$")  # `$` math delimiters, not the escaped `\$` currency sign


def symbolic_equal(pred: str, gold: str, wrap_gold: bool = True) -> bool:
    """math-verify's verdict on `pred` against `gold`, without any timeout of its own (the caller provides one)."""
    global _EXTRACTION_CONFIG
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if _EXTRACTION_CONFIG is None:
        from latex2sympy2_extended import NormalizationConfig

        # The answer is already extracted, so wrap it in \boxed{} to make math-verify read exactly that span.
        _EXTRACTION_CONFIG = [
            LatexExtractionConfig(boxed_match_priority=0, normalization_config=NormalizationConfig(units=True)),
            ExprExtractionConfig(),
        ]
    # A reference solution without a final-answer marker is parsed as free text, as TRL's accuracy_reward does.
    gold_text = f"\\boxed{{{_MATH_DELIMITER.sub('', gold)}}}" if wrap_gold else gold
    gold_parsed = parse(gold_text, _EXTRACTION_CONFIG, parsing_timeout=None)
    pred_parsed = parse(f"\\boxed{{{_MATH_DELIMITER.sub('', pred)}}}", _EXTRACTION_CONFIG, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def call_with_soft_timeout(seconds: float | None, func, *args) -> Any:
    """Run `func(*args)` (main thread only) under a SIGALRM interval timer with sub-second precision."""

    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:  # a late signal after the call finished must not escape into the caller
            raise SoftTimeout()

    if not seconds or seconds <= 0:
        return func(*args)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return func(*args)
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def silence_math_verify() -> None:
    # We pass timeouts of None on purpose; math-verify would warn about it, and log every comparison error.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _exit_when_orphaned(cpu_seconds: float = 0.5) -> None:
    """Exit if the parent process dies, even in the middle of a computation.

    The check runs from a SIGVTALRM handler every `cpu_seconds` of CPU time: signal handlers still run while a long
    big-integer operation holds the GIL (CPython checks for signals inside them, which is also what lets the soft
    timeout work), whereas a watchdog thread would never get the GIL back. An idle orphan uses no CPU and exits on
    stdin EOF instead. Not `prctl(PR_SET_PDEATHSIG)`: it fires when the parent *thread* that spawned the worker exits,
    and the trainer may call rewards from short-lived threads.
    """
    parent = os.getppid()

    def check(signum, frame):
        if os.getppid() != parent:
            os._exit(0)

    signal.signal(signal.SIGVTALRM, check)
    signal.setitimer(signal.ITIMER_VIRTUAL, cpu_seconds, cpu_seconds)


def _limit_memory(max_bytes: int = _WORKER_MEMORY_LIMIT) -> None:
    """Cap the worker's address space, so an expression that builds a huge number fails with MemoryError (0.0)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft > max_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (max_bytes, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not permitted: the time limit still applies
        pass


def _worker_main() -> None:
    """Entry point of the verification worker: one JSON request per stdin line, one JSON reply per line."""
    _exit_when_orphaned()
    _limit_memory()
    # Reply on a private copy of stdout and point fd 1 at stderr, so a stray print in a library cannot corrupt the
    # protocol.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    silence_math_verify()
    try:
        symbolic_equal("1", "1")  # import math-verify and sympy and compile the LaTeX grammar before "ready"
    except BaseException as exc:
        channel.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return
    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            result = call_with_soft_timeout(
                request.get("soft"), symbolic_equal, request["pred"], request["gold"], request.get("wrap_gold", True)
            )
            reply = {"ok": result}
        except SoftTimeout:
            reply = {"ok": False, "timeout": True}
        except Exception as exc:  # never die on a bad expression; the parent scores it 0.0
            reply = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        channel.write(json.dumps(reply) + "\n")


# The worker loads this file without running the package `__init__`s (they import torch/TRL: seconds per spawn): it
# registers the parent packages as bare namespace modules first, then imports this module, which uses only the
# standard library.
_BOOTSTRAP = """
import sys, types
module_name, *package_dirs = sys.argv[1:]
parts = module_name.split(".")
for depth, path in enumerate(package_dirs, start=1):
    package = types.ModuleType(".".join(parts[:depth]))
    package.__path__ = [path]
    sys.modules[package.__name__] = package
__import__(module_name, fromlist=["_worker_main"])._worker_main()
"""


class VerifierWorker:
    """Parent-side handle on the verification worker: spawn, request with a hard deadline, kill and replace."""

    startup_timeout = 120.0  # for imports on a loaded machine; not counted against any completion's time limit

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buffer = b""
        self._owner_pid = os.getpid()
        self.unavailable_reason: str | None = None
        self.stats = {"requests": 0, "timeouts": 0, "restarts": 0, "errors": 0}

    def _spawn(self) -> None:
        package_dirs = []
        path = os.path.dirname(os.path.abspath(__file__))
        for _ in __name__.split(".")[:-1]:
            package_dirs.insert(0, path)
            path = os.path.dirname(path)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, __name__, *package_dirs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
            # Own session: a Ctrl-C aimed at the trainer does not print a worker traceback; the worker exits on EOF.
            start_new_session=True,
        )
        self._ready = False
        self._buffer = b""

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(timeout=5)
            except Exception:
                pass
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except Exception:
                    pass
        self._proc = None
        self._ready = False

    def _read_line(self, deadline: float) -> dict:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("verification worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _ensure_ready(self) -> bool:
        if self.unavailable_reason is not None:
            return False
        if self._owner_pid != os.getpid():  # we are a forked child: the pipes belong to the parent's worker
            self._proc, self._ready, self._owner_pid = None, False, os.getpid()
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
        if not self._ready:
            try:
                hello = self._read_line(time.monotonic() + self.startup_timeout)
            except (TimeoutError, EOFError, OSError, ValueError) as exc:
                hello = {"ready": False, "error": repr(exc)}
            if not hello.get("ready"):
                self._kill()
                self.unavailable_reason = str(hello.get("error"))
                logger.warning(
                    "The math verification worker could not start (%s); verifying in-process instead, where the time "
                    "limit only applies on the main thread.",
                    self.unavailable_reason,
                )
                return False
            self._ready = True
        return True

    def verify(self, pred: str, gold: str, wrap_gold: bool, timeout: float, soft_fraction: float | None) -> str:
        """Return `"equal"`, `"different"`, `"timeout"`, `"error"` or `"unavailable"` (caller then runs in-process)."""
        with self._lock:
            if not self._ensure_ready():
                return "unavailable"
            self.stats["requests"] += 1
            request = {"pred": pred, "gold": gold, "wrap_gold": wrap_gold}
            if soft_fraction:
                request["soft"] = timeout * soft_fraction
            deadline = time.monotonic() + timeout
            try:
                self._proc.stdin.write((json.dumps(request) + "\n").encode())
                reply = self._read_line(deadline)
            except TimeoutError:
                self.stats["timeouts"] += 1
                self._restart()
                return "timeout"
            except (EOFError, OSError, ValueError):  # crashed (e.g. out of memory) or garbled
                self.stats["errors"] += 1
                self._restart()
                return "error"
            except BaseException:  # interrupted (Ctrl-C in a notebook) with this reply in flight: the next request
                self._kill()  # would read it as its own. A fresh worker is spawned on the next request.
                raise
            if reply.get("timeout"):
                self.stats["timeouts"] += 1
                return "timeout"
            if reply.get("error"):
                self.stats["errors"] += 1
            return "equal" if reply.get("ok") else "different"

    def _restart(self) -> None:
        # Start the replacement now so that its imports overlap with the caller's other work.
        self._kill()
        self.stats["restarts"] += 1
        try:
            self._spawn()
        except OSError as exc:
            self.unavailable_reason = repr(exc)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._owner_pid == os.getpid():
                try:
                    self._proc.stdin.close()  # the worker exits on EOF
                    self._proc.wait(timeout=2)
                except Exception:
                    pass
                self._kill()


_WORKER: VerifierWorker | None = None
_WORKER_LOCK = threading.Lock()


def get_worker() -> VerifierWorker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = VerifierWorker()
            atexit.register(_WORKER.close)
        return _WORKER
