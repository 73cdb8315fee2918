"""The engine process a worker launches (``--launch``), restarted with backoff when it dies.

On Linux the engine gets SIGTERM if the worker itself dies, so a killed worker never
leaves an orphaned engine holding the GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import shlex
import signal
import sys

log = logging.getLogger("mesh.worker.engine")

_PR_SET_PDEATHSIG = 1
_MAX_BACKOFF = 30.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineProcess:
    def __init__(self, command: str) -> None:
        self.argv = shlex.split(command)
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="mesh-engine-supervisor")

    async def _spawn(self) -> None:
        log.info("starting engine: %s", self.argv[0])
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, preexec_fn=_die_with_parent, start_new_session=True
        )

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            log.warning("engine exited with %s; restarting in %.0f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)
            self.restarts += 1
            await self._spawn()

    async def stop(self, grace: float = 20.0) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
