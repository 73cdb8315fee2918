"""Request ids: unique, in the documented shape, in time order for the indexes keyed by them,
and never repeated by a forked worker."""

from __future__ import annotations

import os
import re
import time

from mesh.http.ids import request_id

SHAPE = re.compile(r"req_[0-9a-f]{24}")


def test_request_ids_are_unique_and_shaped() -> None:
    ids = [request_id() for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    assert all(SHAPE.fullmatch(i) for i in ids)


def test_request_ids_lead_with_their_second() -> None:
    before = int(time.time())
    ids = [request_id() for _ in range(1_000)]
    after = int(time.time())
    seconds = [int(i[4:12], 16) for i in ids]
    assert all(before <= s <= after for s in seconds)
    assert seconds == sorted(seconds)


def test_a_forked_child_never_hands_out_its_parent_s_ids() -> None:
    request_id()  # the parent has drawn a batch; the child inherits it unless it drops it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(request_id() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {request_id() for _ in range(300)}
    assert len(child) == 300 and not child & parent
