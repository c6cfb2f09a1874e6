"""Simulation: nodes crash at any step, and failure repairs keep the object space sound.

Hypothesis drives three or four cores (``store.core.router.Router``, through the tests'
``CoreNode``) with single-writer creates, gets, updates and removes from any node, delivers
their messages one at a time on FIFO links in any order, crashes any node at any step (its
messages are never delivered again, whatever it held is gone), and has the survivors learn
each failure repair one at a time, as the controller's commands would reach them; a survivor
reports what it holds all at once or (as the shell paces it) one object per step.  What
was queued for a dead node goes back to its sender's core at the repair (the shell's
queue); what the dead node sent is lost.

Multi-writer objects are called (blocking) from any node too: each acknowledged call is
applied exactly once, never twice, and a failed one never to an object a survivor holds.

Invariants, after every step: no object is held by two live nodes.  Once every repair is
learnt and every message delivered: every operation of a live node has finished
(resolved or failed: none hangs); the key record at each key's owner names exactly the live
node holding the object, or says it is absent or lost where no live node holds it; every
object's value equals the updates acknowledged on it (an object moves with its state: no
update lost, none applied twice); and every core's own invariants hold.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ring.hashring import HashRing, key_token
from ring.ownership import NodeView, Stage
from store.core.instructions import DrainStep, Repair, Undeliverable
from store.core.key_layer import KeyState
from store.core.scheduler import Wait
from store.wire.messages import Message
from tests.fixtures.core import CoreNode
from tests.fixtures.objects import MAPS
from tests.sim.settings import simulation_settings

KEYS = 3
VNODES = 8


class CrashMachine(RuleBasedStateMachine):
    @initialize(count=st.sampled_from([3, 4]))
    def start(self, count: int) -> None:
        self.names = [f"n{i}" for i in range(count)]
        self.ring = HashRing(self.names, vnodes=VNODES, epoch=1)
        self.nodes = {n: CoreNode(n, self.ring, MAPS) for n in self.names}
        self.dead: set[str] = set()
        self.queues: dict[tuple[str, str], deque[Message]] = {}
        self.to_learn: dict[str, int] = {}  # survivor -> the repair epoch it has yet to learn
        self.epoch = 1
        self.ops: list[tuple[str, str, Wait[Any], Any]] = []  # (node, kind, wait, k)
        self.refs: list[tuple[str, Any, Any]] = []  # open references: (node, (map, key), held)
        self.adds: dict[int, int] = {}  # object uid -> updates acknowledged on it
        # Multi-writer calls: each one's (caller, op id); acknowledged, or failed.
        self.next_op = 0
        self.acked: set[tuple[str, int]] = set()
        self.failed: set[tuple[str, int]] = set()

    # -- plumbing --

    def alive(self) -> list[str]:
        return [n for n in self.names if n not in self.dead]

    def collect(self) -> None:
        for name in self.alive():
            for dest, msgs in self.nodes[name].take_outbox().items():
                self.queues.setdefault((name, dest), deque()).extend(msgs)
        self.settle_ops()

    def settle_ops(self) -> None:
        """Opened references are used at once (one update) and kept open for a while."""
        for op in list(self.ops):
            name, kind, wait, k = op
            if name in self.dead:
                self.ops.remove(op)
                continue
            if not wait.done():
                continue
            self.ops.remove(op)
            if kind == "locate":  # a shared object's place known: call it
                try:
                    owner, _ = wait.result()
                except Exception:
                    continue
                self.next_op += 1
                call = (name, self.next_op)
                node = self.nodes[name]
                result = node.call(k, node.router.objects.maps["mw"], "add", (*call, 1), owner, 0.0)
                if not isinstance(result, Wait):
                    self.acked.add(call)  # applied here at once: it holds the object
                else:
                    self.ops.append((name, "call", result, call))
                continue
            if kind == "call":
                try:
                    wait.result()
                except Exception:
                    self.failed.add(k)
                else:
                    self.acked.add(k)
                continue
            if kind != "open":
                continue
            try:
                held, _ = wait.result()
            except Exception:
                continue
            held.obj.add(1)
            self.adds[held.obj.uid] = self.adds.get(held.obj.uid, 0) + 1
            self.refs.append((name, k, held))

    def busy(self) -> list[tuple[str, str]]:
        return sorted(
            p
            for p, q in self.queues.items()
            if q and p[0] not in self.dead and p[1] not in self.dead
        )

    # -- rules --

    @rule(data=st.data(), key=st.integers(0, KEYS - 1), create=st.booleans())
    def open(self, data: st.DataObject, key: int, create: bool) -> None:
        name = data.draw(st.sampled_from(self.alive()))
        node = self.nodes[name]
        held = node.take("sw", key)
        if held is not None:  # the fast path: held here, no reference open
            held.obj.add(1)
            self.adds[held.obj.uid] = self.adds.get(held.obj.uid, 0) + 1
            node.release_ref(("sw", key), held)
            return
        self.ops.append((name, "open", node.acquire("sw", key, create), ("sw", key)))
        self.collect()

    @rule(data=st.data(), key=st.integers(0, KEYS - 1))
    def shared_call(self, data: st.DataObject, key: int) -> None:
        """A blocking call of a multi-writer object (made where it is first asked for,
        and never moving: calls travel to it), from any node."""
        name = data.draw(st.sampled_from(self.alive()))
        self.ops.append((name, "locate", self.nodes[name].locate("mw", key, True), ("mw", key)))
        self.collect()

    @rule(data=st.data(), key=st.integers(0, KEYS - 1))
    def remove(self, data: st.DataObject, key: int) -> None:
        name = data.draw(st.sampled_from(self.alive()))
        self.ops.append((name, "remove", self.nodes[name].remove("sw", key), ("sw", key)))
        self.collect()

    @precondition(lambda self: bool(self.refs))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.refs) - 1))
        name, k, held = self.refs.pop(i)
        if name not in self.dead:
            self.nodes[name].release_ref(k, held)
            self.collect()

    @precondition(lambda self: bool(self.busy()))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        src, dst = data.draw(st.sampled_from(self.busy()))
        self.nodes[dst].handle(self.queues[(src, dst)].popleft(), src)
        self.collect()

    @precondition(lambda self: len(self.names) - len(self.dead) > 1)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.alive()))
        self.dead.add(name)
        self.refs = [r for r in self.refs if r[0] != name]
        for pair in [p for p in self.queues if p[0] == name]:
            del self.queues[pair]  # what it sent is lost with it
        self.epoch += 1
        self.to_learn = {n: self.epoch for n in self.alive()}

    @precondition(lambda self: bool(self.to_learn))
    @rule(data=st.data())
    def learn_repair(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.to_learn)))
        self.learn(name, data.draw(st.booleans()))

    def reporting(self) -> list[str]:
        return [n for n in self.alive() if self.nodes[n].router.objects.reporting]

    @precondition(lambda self: bool(self.reporting()))
    @rule(data=st.data())
    def report_step(self, data: st.DataObject) -> None:
        """A paced repair reports one more object (the shell's drain-paced steps)."""
        name = data.draw(st.sampled_from(self.reporting()))
        self.nodes[name].run(DrainStep(1))
        self.collect()

    def learn(self, name: str, paced: bool = False) -> None:
        # What the node sent before (a call made as a locate was answered) is in the
        # shell's queues by now, where the repair finds what is for the dead.
        self.collect()
        epoch = self.to_learn.pop(name)
        ring = HashRing(self.alive(), vnodes=VNODES, epoch=epoch)
        node = self.nodes[name]
        view = NodeView(name, Stage.NORMAL, ring)
        node.run(Repair(view, frozenset(self.dead), Wait(name), paced))
        for dead in sorted(self.dead):  # what was still queued for the dead comes back
            queue = self.queues.pop((name, dead), None)
            if queue:
                node.run(Undeliverable(dead, list(queue)))
        self.ring = ring
        self.collect()

    def describe(self) -> str:
        """What each live node still waits for (a failure message's appendix)."""
        lines = []
        for name in self.alive():
            objects = self.nodes[name].router.objects
            keys = self.nodes[name].router.keys
            lines.append(
                f"{name}: pending {sorted(objects._pending)}, reporting {objects.reporting}, "
                f"flushes awaited {objects._flush_awaited}, rebuild waits for "
                f"{sorted(keys._rebuild_waiting)}, parked {len(keys._rebuild_parked)}"
            )
        return "\n".join(lines)

    # -- invariants --

    @invariant()
    def no_object_held_twice(self) -> None:
        if not hasattr(self, "nodes"):
            return
        for key in range(KEYS):
            holders = [
                n
                for n in self.alive()
                if ("sw", key) in self.nodes[n].router.objects.objects
                and not self.nodes[n].router.objects.objects[("sw", key)].removed
            ]
            assert len(holders) <= 1, f"key {key} held by {holders}"

    def teardown(self) -> None:
        if not hasattr(self, "nodes"):
            return
        for name in sorted(self.to_learn):
            self.learn(name)
        for name in self.reporting():
            self.nodes[name].run(DrainStep(KEYS))
        for _ in range(1000):  # every reference is let go in the end, as new ones open
            for name, k, held in self.refs:
                if name not in self.dead:
                    self.nodes[name].release_ref(k, held)
            self.refs = []
            self.collect()
            busy = self.busy()
            if not busy and not self.refs:
                break
            if busy:
                src, dst = busy[0]
                self.nodes[dst].handle(self.queues[(src, dst)].popleft(), src)
                self.collect()
        unfinished = [(n, kind, k) for n, kind, w, k in self.ops if not w.done()]
        assert not unfinished, f"never finished: {unfinished}\n{self.describe()}"
        owner_ring = HashRing(self.alive(), vnodes=VNODES, epoch=self.epoch)
        for key in range(KEYS):
            k = ("sw", key)
            holders = [
                n
                for n in self.alive()
                if k in self.nodes[n].router.objects.objects
                and not self.nodes[n].router.objects.objects[k].removed
            ]
            owner = owner_ring.owner(key_token(*k))
            rec = self.nodes[owner].router.keys.record(k)
            if holders:
                held = self.nodes[holders[0]].router.objects.objects[k]
                assert rec is not None and rec.state is KeyState.LIVE, (key, holders, rec)
                assert rec.owner == holders[0], (key, rec.owner, holders)
                assert held.obj.value == self.adds.get(held.obj.uid, 0), (
                    f"key {key}: value {held.obj.value}, acknowledged "
                    f"{self.adds.get(held.obj.uid, 0)}"
                )
            else:
                assert rec is None or not rec.exists or rec.owner in self.dead, (key, rec.state)
                assert rec is None or rec.state is not KeyState.LIVE, (key, rec.owner)
        # Multi-writer calls: each acknowledged call was applied exactly once (to a live
        # object, or to one that died with its holder); none applied twice; a call that
        # failed was not applied to an object a survivor holds.
        applied: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for name, node in self.nodes.items():
            for (map_name, _key), held in node.router.objects.objects.items():
                if map_name == "mw" and not held.removed:
                    for caller, op in held.obj.log:
                        applied.setdefault((caller, op), []).append((name, held.obj.uid))
        for call, where in applied.items():
            assert len(where) == 1, f"{call} applied {len(where)} times: {where}"
        for call in self.acked:
            assert call in applied, f"acknowledged {call} applied nowhere"
        for call in self.failed:
            where = applied.get(call, [])
            assert all(n in self.dead for n, _ in where), f"failed {call} applied at {where}"
        for name in self.alive():
            self.nodes[name].router.validate()


TestCrashes = CrashMachine.TestCase
TestCrashes.settings = simulation_settings(max_examples=150, stateful_step_count=50)
