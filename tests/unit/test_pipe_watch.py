"""PipeWatch: report pipes followed through one epoll that is a single reader of the loop."""

from __future__ import annotations

import asyncio
import os

from tsd.reportpipe import PipeWatch


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _test_each_readable_pipe_gets_its_call_and_an_unread_one_is_called_again() -> None:
    loop = asyncio.get_running_loop()
    watch = PipeWatch(loop)
    (a_r, a_w), (b_r, b_w) = os.pipe(), os.pipe()
    seen: list[str] = []
    watch.add(a_r, lambda: seen.append("a"))
    watch.add(b_r, lambda: (seen.append("b"), os.read(b_r, 10)))
    os.write(a_w, b"x")
    os.write(b_w, b"y")
    await _turns()
    # a was never read: level-triggered, it is called at every turn; b once.
    assert seen.count("b") == 1
    assert seen.count("a") >= 2
    watch.close()
    for fd in (a_r, a_w, b_r, b_w):
        os.close(fd)


async def _test_a_pipe_removed_by_an_earlier_call_of_the_same_turn_is_not_called() -> None:
    loop = asyncio.get_running_loop()
    watch = PipeWatch(loop)
    (a_r, a_w), (b_r, b_w) = os.pipe(), os.pipe()
    seen: list[str] = []

    def on_a() -> None:
        seen.append("a")
        os.read(a_r, 10)
        watch.remove(b_r)

    def on_b() -> None:
        seen.append("b")
        os.read(b_r, 10)
        watch.remove(a_r)

    watch.add(a_r, on_a)
    watch.add(b_r, on_b)
    os.write(a_w, b"x")
    os.write(b_w, b"y")
    await _turns()
    assert seen in (["a"], ["b"])  # whichever came first removed the other
    watch.close()
    for fd in (a_r, a_w, b_r, b_w):
        os.close(fd)


async def _test_close_leaves_the_loop_no_reader_and_a_later_add_works_again() -> None:
    loop = asyncio.get_running_loop()
    watch = PipeWatch(loop)
    r, w = os.pipe()
    seen: list[int] = []
    watch.add(r, lambda: seen.append(len(os.read(r, 10))))
    watch.close()
    os.write(w, b"ab")
    await _turns()
    assert seen == []  # closed: nothing called, and the loop has no reader of ours left
    watch.add(r, lambda: seen.append(len(os.read(r, 10))))
    await _turns()
    assert seen == [2]
    watch.remove(r)
    watch.remove(r)  # twice is harmless
    os.write(w, b"c")
    await _turns()
    assert seen == [2]
    watch.close()
    os.close(r)
    os.close(w)


async def _test_a_removed_fd_number_reused_by_a_new_pipe_is_watched_afresh() -> None:
    loop = asyncio.get_running_loop()
    watch = PipeWatch(loop)
    r, w = os.pipe()
    watch.add(r, lambda: None)
    watch.remove(r)
    os.close(r)
    os.close(w)
    r2, w2 = os.pipe()  # most often the same numbers again
    seen: list[bytes] = []
    watch.add(r2, lambda: seen.append(os.read(r2, 10)))
    os.write(w2, b"z")
    await _turns()
    assert seen == [b"z"]
    watch.close()
    os.close(r2)
    os.close(w2)


def test_each_readable_pipe_gets_its_call_and_an_unread_one_is_called_again() -> None:
    asyncio.run(_test_each_readable_pipe_gets_its_call_and_an_unread_one_is_called_again())


def test_a_pipe_removed_by_an_earlier_call_of_the_same_turn_is_not_called() -> None:
    asyncio.run(_test_a_pipe_removed_by_an_earlier_call_of_the_same_turn_is_not_called())


def test_close_leaves_the_loop_no_reader_and_a_later_add_works_again() -> None:
    asyncio.run(_test_close_leaves_the_loop_no_reader_and_a_later_add_works_again())


def test_a_removed_fd_number_reused_by_a_new_pipe_is_watched_afresh() -> None:
    asyncio.run(_test_a_removed_fd_number_reused_by_a_new_pipe_is_watched_afresh())
