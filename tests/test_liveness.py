"""engine/liveness.py: the heartbeat that ends a run when a peer stops answering, on a real TCPStore in this process
(two or three Watch objects stand for ranks; a rank "freezes" when its thread stops without saying it finished).
Periods are a tenth of a second here; every wait is bounded. The multi-host behaviour (a frozen host, a cut link, a
killed host, with real launchers) is tests/test_system.py's."""
import datetime
import threading

import pytest
import torch.distributed as dist

from mff_ds.common import UserError
from mff_ds.engine import liveness

HOSTS = ["hosta", "hostb", "hostc"]


@pytest.fixture
def store():
    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=5), wait_for_workers=False)
    yield master


def ranks(store, world=2, lost_after=0.6, grace=0.2, prefix="t"):
    """Started watches for `world` ranks; each records the line it would end its process with."""
    ended = [threading.Event() for _ in range(world)]
    lines = [[] for _ in range(world)]

    def end(r):
        return lambda line: (lines[r].append(line), ended[r].set())
    watches = [liveness.Watch(r, world, HOSTS[:world], "127.0.0.1", store.port, lost_after, period=0.1,
                              prefix=prefix, grace=grace, end=end(r)) for r in range(world)]
    watches[0].start()  # rank 0 registers every rank's counter
    for w in watches[1:]:
        w.start()
    return watches, ended, lines


def freeze(w):
    """The rank's process stops answering (SIGSTOP, a cut link): its thread stops, nothing is said."""
    w._stop.set()
    w._thread.join(5)


def test_a_rank_that_stops_answering_is_named_by_rank_0_and_every_rank_ends(store):
    watches, ended, lines = ranks(store, world=3)
    watches[2].step = 7
    watches[0].step = 7
    watches[0].hint = lambda: "newest complete checkpoint /run/checkpoints/global_step5"
    freeze(watches[2])
    assert ended[0].wait(10) and ended[1].wait(10)
    said = ("lost peer: rank 2 on hostc (no heartbeat for 1 s) at step 7; newest complete checkpoint "
            "/run/checkpoints/global_step5; rerun with --resume auto (leave out a host that is gone; the batch plan "
            "and a universal checkpoint follow the new world size) [exit 69]")
    assert lines[0] == [said] and lines[1] == [said]  # rank 1 ends with rank 0's published verdict
    for w in watches:
        w.stop()


def test_rank_0_lost_ends_the_others(store):
    watches, ended, lines = ranks(store)
    freeze(watches[0])
    assert ended[1].wait(10)
    assert lines[1][0].startswith("lost peer: rank 0 on hosta (no heartbeat for 1 s) during start-up; no checkpoint")
    watches[1].stop()


def test_a_store_that_stops_answering_ends_the_run_naming_rank_0s_host():
    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=5), wait_for_workers=False)
    watches, ended, lines = ranks(master)
    freeze(watches[0])
    del master  # rank 0's process, which held the store, is gone
    assert ended[1].wait(20)
    assert lines[1][0].startswith("lost peer: rank 0 on hosta (") and ("no heartbeat" in lines[1][0] or
                                                                       "rendezvous store" in lines[1][0])
    watches[1].stop()


def test_a_store_whose_calls_never_return_ends_the_run_naming_rank_0s_host(store):
    """Rank 0's host cut off or powered down: its connections are never closed, and a TCPStore client's call then
    blocks for ever whatever its timeout (measured on the cluster rig). Each call is bounded instead."""
    watches, ended, lines = ranks(store)
    release = threading.Event()

    class Vanished:  # every call blocks, as on a connection whose peer is gone without a word
        def __getattr__(self, name):
            return lambda *a, **k: release.wait()
    freeze(watches[0])
    watches[1]._connect = Vanished
    watches[1]._store = Vanished()
    try:
        assert ended[1].wait(20)
        assert lines[1][0].startswith("lost peer: rank 0 on hosta (the rendezvous store at 127.0.0.1:")
        assert "has not answered for 1 s (TimeoutError)" in lines[1][0]
    finally:
        release.set()
        watches[1].stop()


def test_no_alarm_for_a_pause_shorter_than_the_timeout_nor_for_a_rank_that_finished(store):
    watches, ended, lines = ranks(store, lost_after=1.0)
    watches[1]._stop.set()  # paused for less than the timeout, then going on
    watches[1]._thread.join(5)
    assert not ended[0].wait(0.5)
    watches[1]._stop.clear()
    watches[1]._thread = threading.Thread(target=watches[1]._run, daemon=True)
    watches[1]._thread.start()
    assert not ended[0].wait(1.5) and not ended[1].is_set()
    watches[1].done()  # finished: not a peer to wait for
    assert not ended[0].wait(2.0) and lines == [[], []]
    watches[0].stop()


def test_a_rank_that_stops_with_an_error_ends_the_others_naming_it(store):
    watches, ended, lines = ranks(store, world=3)
    watches[1].failed("error: data.path: ImageFolder root '/data' is not a directory")
    assert ended[0].wait(10) and ended[2].wait(10) and not ended[1].is_set()
    said = ("rank 1 on hostb stopped: error: data.path: ImageFolder root '/data' is not a directory; no checkpoint "
            "yet")
    assert lines[0] == [said] and lines[2] == [said]


def test_a_failed_collective_is_explained_by_the_heartbeat_that_stopped_or_not_at_all(store):
    watches, ended, lines = ranks(store, prefix="x", lost_after=30)  # long: only explain() decides here
    error = RuntimeError("[gloo] Connection closed by peer [198.18.0.3]:5000")
    assert watches[0].explain(error, wait=0.5) is None  # every heartbeat moves: not a lost peer
    freeze(watches[1])
    line = watches[0].explain(error, wait=0.5)
    assert line.startswith("lost peer: rank 1 on hostb (a collective failed (RuntimeError: [gloo] Connection closed "
                           "by peer [198.18.0.3]:5000) and its heartbeat stopped) during start-up")
    assert not ended[0].is_set()  # the main thread says it, not the watch thread


def test_the_peer_timeout_setting():
    assert liveness.lost_after_s(None, {}) == 45.0 and liveness.lost_after_s(20, {}) == 20.0
    assert liveness.lost_after_s(20, {"MFF_DS_PEER_TIMEOUT_S": "0"}) == 0.0
    with pytest.raises(UserError, match=r"MFF_DS_PEER_TIMEOUT_S: expected a number of seconds >= 0 \(0: off\), "
                                        r"got 'soon'"):
        liveness.lost_after_s(20, {"MFF_DS_PEER_TIMEOUT_S": "soon"})
    assert liveness.who([3], HOSTS + ["hostd"]) == "rank 3 on hostd"
    assert liveness.who([1, 2, 0], ["a", "b", "b"]) == "a (rank 0), b (ranks 1, 2)"


def test_torchruns_restarts_get_a_store_of_their_own_or_are_refused_where_none_can_agree(store):
    """torchrun's agent keeps one store for every restart of its workers: on one host each restart gets its own
    prefix (the restart count); over several hosts with --max-restarts the hosts count restarts apart, so the
    start is refused naming TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (distributed.restart_store)."""
    from mff_ds.engine.distributed import DistEnv, restart_store
    d = DistEnv(0, 2, 0, "127.0.0.1", store.port, "env")
    agent = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1", "TORCHELASTIC_RESTART_COUNT": "2",
             "TORCHELASTIC_MAX_RESTARTS": "3"}
    prefixed = restart_store(d, datetime.timedelta(seconds=5), agent)
    prefixed.set("k", "v")
    client = dist.TCPStore("127.0.0.1", store.port, None, False, timeout=datetime.timedelta(seconds=5))
    assert dist.PrefixStore("/mff_ds/attempt_2", client).get("k") == b"v"
    assert not dist.PrefixStore("/mff_ds/attempt_1", client).check(["k"])  # the attempt before sees none of it
    assert restart_store(d, datetime.timedelta(seconds=5), dict(agent, TORCHELASTIC_USE_AGENT_STORE="False")) is None
    hosts = dict(agent, GROUP_WORLD_SIZE="2")
    with pytest.raises(UserError, match=r"torchrun --max-restarts over 2 hosts: expected "
                                        r"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment"):
        restart_store(d, datetime.timedelta(seconds=5), hosts)
    assert restart_store(d, datetime.timedelta(seconds=5), dict(hosts, TORCHELASTIC_MAX_RESTARTS="0")) is None
