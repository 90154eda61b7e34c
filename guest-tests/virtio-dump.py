#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Debug aid for a guest that stopped making progress: asks QEMU's human monitor (a Unix socket)
# for every virtio device's queue status and reads the avail and used rings out of guest memory,
# so a lost notification (used idx == avail idx, guest still waiting) can be told from a
# request the backend never took (used idx behind avail idx). Prints to stdout.
#
# Usage: virtio-dump.py MONITOR_SOCKET

import re
import socket
import sys

from hmp import hmp


def main():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    hmp(sock, None)  # the banner and first prompt
    devices = hmp(sock, "info virtio")
    print("== info virtio\n" + devices)
    summary = []
    for path in re.findall(r"^(/\S+)", devices, re.M):
        for command in (f"info virtio-status {path}", f"info virtio-queue-status {path} 0"):
            status = hmp(sock, command)
            print(f"== {command}\n{status}")
        queue = hmp(sock, f"info virtio-queue-status {path} 0")
        num = re.search(r"\bnum:\s*(\d+)", queue)
        for ring, entry_size in (("avail", 2), ("used", 8)):
            m = re.search(rf"{ring}:\s*(0x[0-9a-f]+)", queue)
            if not m or not num:
                continue
            base = int(m.group(1), 16)
            idx = read_u16(sock, base + 2)
            event = read_u16(sock, base + 4 + entry_size * int(num.group(1)))
            if ring == "avail":
                avail_idx, used_event = idx, event
            else:
                summary.append(summarise(path, avail_idx, used_event, idx, event))
            # flags and idx, then the event field after the ring (used_event in the avail ring,
            # avail_event in the used ring; VIRTIO_RING_F_EVENT_IDX).
            print(f"== {path} {ring} ring at {base:#x}: flags, idx")
            print(hmp(sock, f"xp /2hx {base:#x}"))
            event = base + 4 + entry_size * int(num.group(1))
            print(f"== {path} {ring} ring event field at {event:#x}")
            print(hmp(sock, f"xp /1hx {event:#x}"))
    print("== summary")
    for line in summary:
        print(line)
    sock.close()


def read_u16(sock, address):
    """One little-endian u16 of guest memory."""
    m = re.search(r":\s*0x([0-9a-f]+)", hmp(sock, f"xp /1hx {address:#x}"))
    return int(m.group(1), 16) if m else -1


def summarise(path, avail_idx, used_event, used_idx, avail_event):
    """One line per queue: requests the backend has not completed, and what that suggests."""
    pending = (avail_idx - used_idx) & 0xFFFF
    line = (f"SUMMARY {path} queue 0: avail.idx={avail_idx} used.idx={used_idx} "
            f"pending={pending} used_event={used_event} avail_event={avail_event}")
    if pending and avail_event == used_idx:
        line += (" -> a lost kick: requests wait in the avail ring, and the driver will not"
                 " kick again because it already published past avail_event (a backend must"
                 " re-check avail.idx after writing avail_event, before it sleeps)")
    elif pending:
        line += " -> the backend holds requests it has not completed"
    return line


if __name__ == "__main__":
    main()
