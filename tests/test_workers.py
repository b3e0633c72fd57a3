"""While any worker of ``run_in_worker`` runs: short switch interval, no automatic garbage collection;
afterwards exactly the settings from before the first of them, however each ended."""

from __future__ import annotations

import gc
import sys
import threading

import pytest
import trio
import trio.testing

from mtls.workers import WORKER_SWITCH_INTERVAL, run_in_worker

BEFORE_INTERVAL = 0.003  # not the default, so a restore to the default would be seen


@pytest.fixture(params=[True, False], ids=["gc-on", "gc-off"])
def settings_before(request):
    """(switch interval, gc enabled) set before the test; the process's own put back after it."""
    saved = sys.getswitchinterval(), gc.isenabled()
    sys.setswitchinterval(BEFORE_INTERVAL)
    (gc.enable if request.param else gc.disable)()
    yield BEFORE_INTERVAL, request.param
    sys.setswitchinterval(saved[0])
    (gc.enable if saved[1] else gc.disable)()


def current() -> tuple[float, bool]:
    return sys.getswitchinterval(), gc.isenabled()


class HeldWorker:
    """A worker that says (to the loop) when it runs and waits for ``release`` to end, maybe raising."""

    def __init__(self):
        self.running = trio.Event()
        self.ended = trio.Event()  # set by the caller's task once run_in_worker has returned or raised
        self._release = threading.Event()
        self.seen: tuple[float, bool] | None = None

    def work(self, fail: bool) -> str:
        trio.from_thread.run_sync(self.running.set)
        self._release.wait()
        self.seen = current()
        if fail:
            raise RuntimeError("the worker failed")
        return "built"

    def release(self) -> None:
        self._release.set()

    async def call(self, fail: bool = False, results: list | None = None) -> None:
        try:
            result = await run_in_worker(self.work, fail)
        except RuntimeError as exc:
            result = str(exc)
        finally:
            self.ended.set()
        if results is not None:
            results.append(result)


@pytest.mark.parametrize("first_to_end", ["first-started", "second-started"])
async def test_overlapping_workers_give_the_settings_back_only_when_the_last_one_ends(settings_before, first_to_end):
    one, two = HeldWorker(), HeldWorker()
    results = []
    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(one.call, False, results)
            await one.running.wait()
            assert current() == (WORKER_SWITCH_INTERVAL, False)
            nursery.start_soon(two.call, False, results)
            await two.running.wait()

            early, late = (one, two) if first_to_end == "first-started" else (two, one)
            early.release()
            await early.ended.wait()
            assert current() == (WORKER_SWITCH_INTERVAL, False)  # the other one still runs
            late.release()
            await late.ended.wait()
            assert current() == settings_before
        finally:  # a failed assertion must not leave a thread waiting (the nursery would wait for it)
            one.release()
            two.release()

    assert one.seen == two.seen == (WORKER_SWITCH_INTERVAL, False)
    assert results == ["built", "built"]


async def test_a_worker_that_raises_gives_the_settings_back_and_the_caller_sees_the_error(settings_before):
    worker = HeldWorker()
    worker.release()
    with pytest.raises(RuntimeError, match="the worker failed"):
        await run_in_worker(worker.work, True)
    assert worker.seen == (WORKER_SWITCH_INTERVAL, False)
    assert current() == settings_before


async def test_a_cancelled_caller_waits_for_its_worker_and_only_then_gives_the_settings_back(settings_before):
    worker = HeldWorker()
    cancelled = trio.Event()
    async with trio.open_nursery() as nursery:
        async def cancelled_caller():
            with trio.CancelScope() as scope:
                nursery.start_soon(cancel_when_running, scope)
                await worker.call()
            cancelled.set()

        async def cancel_when_running(scope):
            await worker.running.wait()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()  # an abandoning caller would have ended by now
            try:
                assert current() == (WORKER_SWITCH_INTERVAL, False)  # the worker is not abandoned
                assert not worker.ended.is_set()
            finally:
                worker.release()

        nursery.start_soon(cancelled_caller)
        await cancelled.wait()
        assert worker.ended.is_set()
        assert current() == settings_before
