"""A test supervisor for `openai-input run`: spawns the real process and speaks the protocol.

It records every stdout line (and fails on any that is not a protocol message), persists the
events of each complete batch into a shared list, then acknowledges the batch — what Elastic
Agent or any other supervisor is expected to do.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict


class Supervisor:
    def __init__(self, state_dir, now: float | None = None, *, ack: bool = True, args=(), persisted=None,
                 log_level: str = "WARNING", python_args=("-m", "agent_input.cli"), env=None):
        env = {**os.environ, **(env or {})}
        env.pop("OPENAI_ADMIN_KEY", None)
        cmd = [sys.executable, *python_args, "run", "--state-dir", str(state_dir),
               "--log-level", log_level, *args]
        if now is not None:
            cmd += ["--now", str(now)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
        self.ack = ack
        self.persisted = persisted if persisted is not None else []
        self.messages: list[dict] = []
        self.bad_lines: list[bytes] = []
        self.stderr: list[bytes] = []
        self.partial: dict[int, list[dict]] = defaultdict(list)
        self.acked: list[int] = []
        self.complete: list[int] = []
        self._cond = threading.Condition()
        self._wlock = threading.Lock()
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._out.start()
        self._err.start()

    # -- io --------------------------------------------------------------------------------------
    def send(self, msg) -> bool:
        line = msg if isinstance(msg, (bytes, str)) else json.dumps(msg)
        if isinstance(line, str):
            line = line.encode()
        with self._wlock:
            try:
                self.proc.stdin.write(line.rstrip(b"\n") + b"\n")
                self.proc.stdin.flush()
                return True
            except (BrokenPipeError, ValueError, OSError):
                return False

    def configure(self, config: dict, cid=None) -> None:
        self.send({"type": "config", "id": cid, "config": config})

    def _read_stdout(self) -> None:
        try:
            self._consume()
        except (ValueError, OSError):  # the test closed our end of the pipe
            pass
        with self._cond:
            self._cond.notify_all()

    def _consume(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
                assert isinstance(msg, dict) and msg.get("type") in ("event", "status")
            except (ValueError, AssertionError):
                with self._cond:
                    self.bad_lines.append(line)
                continue
            with self._cond:
                self.messages.append(msg)
                if msg["type"] == "event":
                    batch = self.partial[msg["batch"]]
                    batch.append(msg)
                    if len(batch) == msg["batch_size"]:
                        del self.partial[msg["batch"]]
                        self.batch_complete(msg["batch"], [dict(_id=m["id"], **m["document"]) for m in batch])
                self._cond.notify_all()

    def batch_complete(self, batch: int, docs: list[dict]) -> None:
        """All of a batch's events arrived (called holding `_cond`): persist, then acknowledge."""
        self.persisted.extend(docs)  # persist first ...
        self.complete.append(batch)
        if self.ack and self.send({"type": "ack", "batch": batch}):  # ... then ack
            self.acked.append(batch)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    # -- queries ---------------------------------------------------------------------------------
    def statuses(self, scope: str | None = None) -> list[dict]:
        with self._cond:
            return [m for m in self.messages if m["type"] == "status" and (scope is None or m["scope"] == scope)]

    def events(self) -> list[dict]:
        with self._cond:
            return [m for m in self.messages if m["type"] == "event"]

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; last messages: {self.messages[-5:]}; "
                                         f"stderr: {b''.join(self.stderr[-5:])[:2000]!r}")
                self._cond.wait(min(left, 0.2))

    def polled(self, streams, revision: int | None = None, after: int = 0) -> bool:
        """Every stream reported the end of a poll (healthy/degraded) after message index `after`."""
        done = set()
        for m in self.messages[after:]:
            if m["type"] == "status" and m["scope"] == "stream" and m["status"] in ("healthy", "degraded"):
                if revision is None or m.get("revision") == revision:
                    done.add(m["stream"])
        return set(streams) <= done

    def wait_polled(self, streams, revision=None, after=0, timeout=60.0):
        self.wait_for(lambda: self.polled(streams, revision, after), timeout, f"a poll of {sorted(streams)}")
        if self.ack:
            self.wait_for(lambda: not self.partial and len(self.acked) == len(self.complete), timeout,
                          "every batch to be acknowledged")

    def stop(self, timeout: float = 30.0) -> int:
        self.send({"type": "stop"})
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._out.join(5)
        self._err.join(5)
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._out.join(5)
        self._err.join(5)

    def stderr_text(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:  # a failed test must not leave a hung process behind
            self.kill()


class InProcess:
    """A `protocol.Runner` driven inside the test process (stdin a pipe, stdout a file): for the
    cases a test has to reach into — a failing outbox delete, an engine that raises — and fast."""

    def __init__(self, state_dir, out_path, **kwargs):
        from agent_input.protocol import ProtocolWriter, Runner

        read_end, self._stdin = os.pipe()
        self.out_path = out_path
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.runner = Runner(ProtocolWriter(fd), state_dir=str(state_dir), stdin=os.fdopen(read_end, "rb"),
                             env={}, **kwargs)
        self.code: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.runner.run(threading.Event())

    def start(self) -> "InProcess":
        self._thread.start()
        return self

    def send(self, msg) -> None:
        line = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        os.write(self._stdin, line + b"\n")

    def messages(self) -> list[dict]:
        with open(self.out_path, "rb") as fh:
            return [json.loads(line) for line in fh if line.endswith(b"\n")]

    def statuses(self, scope: str | None = None) -> list[dict]:
        return [m for m in self.messages() if m["type"] == "status" and (scope is None or m["scope"] == scope)]

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; messages: {self.messages()[-5:]}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Sends `stop`; the exit code, or None when the runner did not stop in time."""
        self.send({"type": "stop"})
        self._thread.join(timeout)
        return None if self._thread.is_alive() else self.code

    def close(self) -> None:
        try:
            os.close(self._stdin)  # end of stdin: a runner still going stops
        except OSError:
            pass
        self._thread.join(10)
