"""systemd's service notifications (sd_notify), standard library only.

Under ``Type=notify`` systemd names a Unix datagram socket in NOTIFY_SOCKET
(a path, or ``@name`` for an abstract socket) and, with ``WatchdogSec=``,
the watchdog period in WATCHDOG_USEC. Both are set by systemd, not by the
admin. Without NOTIFY_SOCKET every call here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("fs_zammad.notify")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        for_us = env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        # Ping twice per period, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) and for_us \
            and self.address else None
        self._warned = False

    def send(self, *assignments: str) -> bool:
        """Send ``READY=1``, ``STATUS=...`` and the like in one datagram."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a wrong socket must not flood the log
                log.warning("cannot notify systemd at NOTIFY_SOCKET=%s: %s",
                            self.address.replace("\0", "@"), exc)
                self._warned = True
            return False
        return True

    def watchdog(self, alive: Callable[[], bool], stopped) -> None:
        """Ping the watchdog while ``alive()`` holds, until ``stopped`` (an Event) is set.

        Run it in the same event loop as the work it vouches for: a hung loop
        then sends no ping and systemd restarts the service.
        """
        if self.watchdog_interval is None:
            return
        while not stopped.wait(self.watchdog_interval):
            if alive():
                self.send("WATCHDOG=1")
