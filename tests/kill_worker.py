"""A fork server for the kill suite: imports graftlab and builds the task once, then forks one child per
command so that killing and resuming a run costs its steps, not an interpreter start.

Protocol, one JSON object per line on stdin, one reply per line on stdout:

    {"run": [argv...], "progress": PATH, "log": PATH}  -> {"pid": N}
        the child runs ``graftlab argv...`` (graftlab.cli.app.run) and appends the number of each
        grafted step it has completed to PATH (after the step's hooks, the Recorder's included)
    {"wait": N}                                         -> {"status": exit code, or -signal}
    {"poll": N}                                         -> {"status": ... or null while it runs}
    {"quit": true}                                      -> (exits)

Run as ``python -m tests.kill_worker`` from the repository root.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import traceback


def _child(argv: list[str], progress: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    code = 1
    try:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        from graftlab.cli.app import run
        from graftlab.graft.optimizer import Graft

        out = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        def report(opt, args, kwargs):
            if isinstance(opt, Graft):
                os.write(out, f"{opt.steps - 1}\n".encode())  # one write: a line is whole or absent

        register_optimizer_step_post_hook(report)
        code = run(argv)
    except SystemExit as err:  # SIGTERM: what `graftlab` does with it
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the log, and as exit status 1
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    import graftlab.cli.app  # noqa: F401 - every import a child needs, done once
    import graftlab.runs  # noqa: F401
    from graftlab.tasks import get_task

    warm = json.loads(os.environ.get("GRAFTLAB_KILL_WARM", "{}"))
    if warm:
        get_task(warm.pop("task"), **warm)  # data and tokenizer built once; the children inherit them
    print(json.dumps({"ready": True}), flush=True)
    reaped: dict[int, int] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("quit"):
            return
        if "run" in msg:
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(msg["run"], msg["progress"], msg["log"])
            print(json.dumps({"pid": pid}), flush=True)
        elif "wait" in msg:
            pid = int(msg["wait"])
            if pid not in reaped:
                reaped[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            print(json.dumps({"status": reaped.pop(pid)}), flush=True)
        elif "poll" in msg:
            pid = int(msg["poll"])
            if pid not in reaped:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    reaped[pid] = os.waitstatus_to_exitcode(status)
            print(json.dumps({"status": reaped.get(pid)}), flush=True)


if __name__ == "__main__":
    main()
