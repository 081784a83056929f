"""How every spot-ingest process ends: the one list of exit codes, used by the
master, the workers, the streaming job, the command lines and the launcher
(which restarts a child for some codes and not for others)."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1            # a fault of the environment: restarting may help
    CONFIG = 2           # a mistake in the configuration, a missing tool: restarting will not help
    INPUT_SET_ASIDE = 3  # the run finished, but some input was set aside, refused or rejected
