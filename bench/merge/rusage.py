"""Run a command and print its wall time and peak RSS as one JSON line.

    rusage.py CMD [ARGS...]

The benchmark measures both sides through this, not from Go: Go starts a
child with clone(CLONE_VM), and Linux carries the parent's RSS high-water
mark into the child's ru_maxrss at exec, so a child of a large test process
would report the parent's peak. Here the command is the child of a small
process (a plain fork of this interpreter, which imports nothing heavy),
and its ru_maxrss (wait4) is its own within a few MiB.
"""
import json
import os
import sys
import time


def main():
    argv = sys.argv[1:]
    if not argv:
        sys.exit("usage: rusage.py CMD [ARGS...]")
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    print(json.dumps({"rc": rc, "seconds": wall, "maxrss_kib": ru.ru_maxrss}))
    sys.exit(0 if rc == 0 else 1)


if __name__ == "__main__":
    main()
