#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# QEMU's human monitor over its Unix socket: `hmp.py SOCKET COMMAND...` runs each command in turn
# and prints its output; virtio-dump.py imports `hmp` from here.

import re
import socket
import sys
import time


def hmp(sock, command, timeout=5.0):
    """Sends one monitor command (None: nothing) and returns its output up to the next prompt."""
    if command is not None:
        sock.sendall(command.encode() + b"\n")
    out = b""
    deadline = time.monotonic() + timeout
    while b"(qemu) " not in out and time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        out += chunk
    text = out.decode(errors="replace").replace("\r", "")
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    text = text.split("(qemu) ")[0]
    # The monitor echoes the command as typed, one redraw per key: drop that first line.
    return text.split("\n", 1)[1] if command and "\n" in text else text


def main():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(sys.argv[1])
    hmp(sock, None)  # the banner and first prompt
    for command in sys.argv[2:]:
        sys.stdout.write(hmp(sock, command))
    sock.close()


if __name__ == "__main__":
    main()
