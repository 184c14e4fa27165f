"""A job's first step, run as a script (`python server/jobs/launch.py SERVER_PID -m ulm train ...`): ask Linux to
send SIGTERM when the server dies (PR_SET_PDEATHSIG, kept across exec), then exec the job's command.

So a server killed with SIGKILL does not leave its jobs writing to the data root: training takes the SIGTERM as a
stop (last checkpoint saved), anything else ends; the restarted server marks the job INTERRUPTED. A script, not
a module of the package, so that nothing is imported before the exec.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 75  # the server was gone before the request took effect


def main() -> None:
    server_pid, argv = int(sys.argv[1]), sys.argv[2:]
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != server_pid:  # it died between our fork and the prctl: nobody would signal us
            sys.exit(EXIT_ORPHANED)
    os.execv(sys.executable, [sys.executable, *argv])


if __name__ == "__main__":
    main()
