"""Scale-in schedules that broke the object space, replayed step by step (issue 12).

The scaling simulation (``test_object_space_scaling``) found these with fresh seeds; a seed
stops replaying the same schedule as soon as the machine or the core changes, so each is
written out here as explicit steps on an :class:`ObjectCluster`, with the invariants checked
after every delivery.  Each test fails with its fix taken out of the core (checked in a
scratch worktree; the hunk is named in the test).  A schedule that still fails is marked
``xfail(strict=True)``: it turns red the day it passes, so that the mark goes with the fix.
"""

from __future__ import annotations

from collections.abc import Iterable

from ring.hashring import key_token
from store.wire.messages import Evacuate, Evacuates
from tests.sim.objects_cluster import ObjectCluster


def leaving(names: Iterable[str], leaver: str, map_name: str, to: str) -> tuple[ObjectCluster, int]:
    """A cluster of ``names`` and a key of ``map_name`` that ``leaver``'s scale-in hands to
    ``to`` (its key owner on the ring without ``leaver``)."""
    c = ObjectCluster(names, keys=8)
    after = c.ring.with_nodes((), [leaver])
    key = next(k for k in c.keys if after.owner(key_token(map_name, k)) == to)
    return c, key


def joining(names: Iterable[str], joiner: str) -> tuple[ObjectCluster, int]:
    """A cluster of ``names`` and a key of ``sw`` that ``joiner`` will own."""
    c = ObjectCluster(names, keys=8)
    after = c.ring.with_nodes([joiner], ())
    key = next(k for k in c.keys if after.owner(key_token("sw", k)) == joiner)
    return c, key


def scale_in(c: ObjectCluster, leaver: str) -> None:
    """``leaver`` leaves: every node PRE_SCALING, then SCALING (nothing delivered yet)."""
    c.mw_refs = [r for r in c.mw_refs if r.node != leaver]
    c.start_event(removed=[leaver])
    assert c.event is not None
    for name in c.event.participants:
        c.enter_pre(name)
    for name in c.event.participants:
        c.enter_scaling(name)


def deliver_all_but(c: ObjectCluster, held: tuple[str, str]) -> None:
    """Deliver everything except what travels on ``held``, checking after each message."""
    for _ in range(10_000):
        pairs = [pair for pair in c.busy_pairs() if pair != held]
        if not pairs:
            return
        c.deliver(pairs[0])
        c.check()
    raise AssertionError("the cluster never went quiet")


def found_at_c_while_fencing(c: ObjectCluster, map_name: str, key: int) -> int:
    """``a`` (holding ``map_name[key]``) leaves and evacuates the object to ``c`` while
    ``c``'s fence to ``a`` is out (``c``'s last numbered message of it went to ``a``): the
    object waits aside at ``c``; then ``c`` finds it at ``c``, where it is not installed
    yet.  Returns the index of that reference of ``c``'s."""
    k = (map_name, key)
    scale_in(c, "a")
    c.drain("a", 10)
    while any(isinstance(msg, (Evacuate, Evacuates)) for msg in c.queues[("a", "c")]):
        c.deliver(("a", "c"))  # the object waits at c for c's fence, sent to a
    assert k in c.nodes["c"].router.objects._fencing
    c.mw_open("c", map_name, key, True)
    deliver_all_but(c, ("a", "c"))
    ref = len(c.mw_refs) - 1
    assert c.mw_refs[ref].owner == "c" and k not in c.nodes["c"].objects
    return ref


def end(c: ObjectCluster) -> None:
    c.deliver_all()
    c.check()
    c.complete_event()
    c.finish()
    c.check_gone()


def test_calls_on_their_way_through_a_leaver_are_not_overtaken() -> None:
    """Per-caller order across a scale-in.  b's two untethered calls are on their way to a
    when a leaves and evacuates the object to c; b then finds the object at c and calls it
    there.  a forwards the first two to c, so the third, sent straight to c, arrived before
    them ("b's call #2 applied after #5").  Fixed by the fence: b's call to c waits until a
    fence sent through a comes back (``ScaleIn._needs_fence``; with it always False this
    test fails)."""
    c, key = leaving(["a", "b", "c"], "a", "mw", to="c")
    c.mw_open("a", "mw", key, True)  # made, so held, at a
    c.deliver_all()
    c.mw_open("b", "mw", key, False)  # b's reference: its calls go to a
    c.deliver_all()
    ref = len(c.mw_refs) - 1
    c.mw_call(ref, "bump", 1)
    c.mw_call(ref, "bump", 2)  # both wait on the pair b -> a
    scale_in(c, "a")
    c.drain("a", 10)  # a evacuates the object to c
    deliver_all_but(c, ("b", "a"))
    assert ("mw", key) in c.nodes["c"].objects
    c.mw_open("b", "mw", key, True, then_call=("bump", 3))  # b finds it at c
    deliver_all_but(c, ("b", "a"))
    end(c)
    calls = [op.id for op in c.ops if op.name == "bump"]
    assert [op_id for _, op_id in c.nodes["c"].objects[("mw", key)].obj.log] == calls


def test_an_object_dropped_while_it_waits_for_a_fence_is_not_installed() -> None:
    """A holder keeping an object after its Drop.  c's own call went to a, so when a leaves
    and evacuates the object to c, c keeps it aside until its fence comes back through a
    (its call must be applied first).  A remove meanwhile sends c the Drop; the object was
    installed when the fence returned anyway ("c holds v2 after its Drop was delivered").
    Fixed in ``ObjectLayer._on_drop``: a Drop of an object still arriving marks it removed
    (without that branch this test fails)."""
    c, key = leaving(["a", "b", "c"], "a", "mw", to="c")
    k = ("mw", key)
    c.mw_open("a", "mw", key, True)
    c.deliver_all()
    c.mw_open("c", "mw", key, False, then_call=("bump", 1))  # c's call goes to a
    c.deliver_all()
    scale_in(c, "a")
    c.drain("a", 10)  # a evacuates the object to c...
    c.deliver(("a", "c"))  # ...where it waits for c's fence, sent to a
    c.check()
    assert k not in c.nodes["c"].objects
    removing = c.remove("b", "mw", key)
    deliver_all_but(c, ("a", "c"))  # the Drop reaches c before its fence is back
    assert c.drops_delivered.get(("c", k), 0) >= 2
    end(c)
    assert removing.result is True
    assert not any(k in s.objects for s in c.nodes.values())


def test_calls_waiting_for_a_fence_at_the_new_holder_apply_in_their_order() -> None:
    """Per-caller order at the new holder itself.  The object is evacuated to c while c's
    fence to the leaver is out; c finds it (at c) and makes an untethered call, then a
    blocking one: both wait for the fence.  When it comes back the untethered call was sent
    to c itself, a message handled after the blocking call, which applied at once ("c's
    call #4 applied after #5").  Fixed in ``ObjectLayer._untethered_now``: a call that
    waited and finds the object held here is applied at once, as a local call is (with
    ``held = None`` there, this test fails)."""
    c, key = leaving(["a", "b", "c"], "a", "mw", to="c")
    k = ("mw", key)
    c.mw_open("a", "mw", key, True)
    c.deliver_all()
    c.mw_open("c", "mw", key, False, then_call=("bump", 1))  # c's call goes to a
    c.deliver_all()
    scale_in(c, "a")
    c.drain("a", 10)
    c.deliver(("a", "c"))  # the object waits at c for c's fence, sent to a
    deliver_all_but(c, ("a", "c"))
    c.mw_open("c", "mw", key, True)  # c finds it at c
    deliver_all_but(c, ("a", "c"))
    ref = len(c.mw_refs) - 1
    assert c.mw_refs[ref].owner == "c" and k not in c.nodes["c"].objects
    c.mw_call(ref, "bump", 2)  # both wait for the fence
    c.mw_call(ref, "add", 3)
    end(c)
    calls = [op.id for op in c.ops if op.name in ("bump", "add")]
    assert [op_id for _, op_id in c.nodes["c"].objects[k].obj.log] == calls


def late_pull_answered(c: ObjectCluster, key: int, *, normal_first: list[str]) -> str:
    """A scale-out to ``d``, the next owner of ``sw[key]``: d, SCALING, looks the key up and
    pulls it from its previous owner; that pull waits while the event drains and the nodes
    of ``normal_first`` (the previous owner among them) enter NORMAL; then it arrives, and
    the previous owner, NORMAL, hands the bare authority on to d (rule N2).  Returns the
    previous owner."""
    prev = c.ring.owner(key_token("sw", key))
    c.start_event(added=["d"])
    assert c.event is not None
    for name in c.event.participants:
        if name != "d":
            c.enter_pre(name)
    for name in c.event.participants:
        c.enter_scaling(name)
    getting = c.sw_open("d", key, False)  # nothing there: d pulls the key from prev
    pull = ("d", prev)
    assert c.queues[pull]
    for name in c.event.participants:
        c.drain(name, 100)
    deliver_all_but(c, pull)
    for name in normal_first:
        c.enter_normal(name)
    c.deliver_all()
    c.check()
    assert getting.result is not None and not getting.error
    return prev


def test_a_bare_record_handed_on_as_it_was_is_forgotten_at_the_end_of_the_event() -> None:
    """Bare records left after an event.  d gets a key's bare authority by a late pull
    after the event ended; d leaves in the next event.  Before 143c31a d kept a bare record
    there and handed it on as it was, version 0, to the key's next owner, which kept it
    after that event ("a keeps bare records [('sw', 0)] after the event") unless
    ``KeyLayer._adopt`` noted a version-0 record as bare (this test failed without the
    ``self._bare.add(k)`` of that branch).  Since 143c31a nothing is kept at d, so this
    schedule no longer reaches that branch: it checks the end state only."""
    c, key = joining(["a", "b", "c"], "d")
    late_pull_answered(c, key, normal_first=["a", "b", "c", "d"])
    # Adopted after d's event had ended: since the fix of the test below, nothing is kept
    # (before it, d kept a bare record, and this test's fix was what forgot it later).
    assert ("sw", key) not in c.nodes["d"].records
    c.start_event(removed=["d"])
    c.complete_event()  # raises if a node keeps a bare record after it
    c.finish()
    c.check_gone()


def test_a_bare_authority_adopted_after_normal_is_not_kept_after_the_event() -> None:
    """Fixed in ``KeyLayer._adopt``: a bare authority adopted in NORMAL is not kept (the
    scaling simulation's "keeps bare records ... after the event", e.g.
    ``--hypothesis-seed=3``).  d, SCALING, pulls a key it will own; the pull
    reaches the previous owner once that node is NORMAL, and its answer, the bare authority
    (rule N2), reaches d once d is NORMAL too, stamped with d's own epoch, so d adopts it
    (rule H) after entering NORMAL, which is when an event's bare records are forgotten: d
    keeps a bare record of the key after the event ("d keeps bare records [('sw', 0)] after
    the event") until the end of the next one.  (Harmless as it stands: d owns the key;
    but nothing forgets it in this event, and it travels on as a version-0 record.)"""
    c, key = joining(["a", "b", "c"], "d")
    prev = c.ring.owner(key_token("sw", key))
    last = next(n for n in ("a", "b", "c") if n != prev)
    others = [n for n in ("a", "b", "c", "d") if n != last]
    late_pull_answered(c, key, normal_first=others)
    c.enter_normal(last)


def test_a_local_call_waits_behind_this_nodes_fence() -> None:
    """Per-caller order between calls waiting for a fence and a call through a local
    reference (the scaling simulation's "applied after" on seeds 15 and 38).  The object
    is evacuated to c while c's fence to the leaver is out, so it waits aside; c finds it
    at c and makes an untethered call, which waits for the fence; the object is removed
    and c makes it anew, held at c at once; c's call through a reference to the new one
    was applied directly, before the call waiting for the fence ("c's call #2 applied
    after #3").  Fixed by ``ObjectLayer.in_order``: the API calls a local multi-writer
    object directly only when no fence or replica of this node's is owed for it, else
    through ``call_now``, which queues the call behind the fence (with ``in_order`` always
    True this test fails)."""
    c, key = leaving(["a", "b", "c"], "a", "mw", to="c")
    k = ("mw", key)
    c.mw_open("a", "mw", key, True)
    c.deliver_all()
    c.mw_open("c", "mw", key, False)
    c.deliver_all()
    ref = len(c.mw_refs) - 1
    c.mw_call(ref, "bump", 1)  # to a
    c.deliver_all()
    ref = found_at_c_while_fencing(c, "mw", key)
    c.mw_call(ref, "bump", 2)  # waits for the fence too
    c.remove("b", "mw", key)
    deliver_all_but(c, ("a", "c"))
    c.mw_open("c", "mw", key, True)  # made anew, at c
    deliver_all_but(c, ("a", "c"))
    assert k in c.nodes["c"].objects
    c.mw_open("c", "mw", key, False, then_call=("bump", 3))  # a local reference
    end(c)
    log = [op_id for _, op_id in c.nodes["c"].objects[k].obj.log]
    second, third = (op.id for op in c.ops if op.name == "bump" and op.arg in (2, 3))
    assert log == [second, third]


def test_a_replica_for_a_joiner_is_not_folded_into_a_newer_object_here() -> None:
    """A replica made for the object at a joiner is not the leaver's evacuation: when the
    object is removed there and made again here, the replica's updates go to the old place
    (where they are lost with the removed object), not into the new object after calls
    already applied to it.  ``ObjectLayer._fold_local_replica`` took a joiner, which is not
    yet in the current ring during SCALING, for a leaver (found with
    ``--hypothesis-seed=2916895236``)."""
    c, key = joining(["a", "b", "c"], "d")
    k = ("mm", key)
    c.start_event(added=["d"])
    assert c.event is not None
    for name in c.event.participants:
        if name != "d":
            c.enter_pre(name)
    for name in c.event.participants:
        c.enter_scaling(name)
    c.mw_open("d", "mm", key, True)  # made, so held, at the joiner
    c.deliver_all()
    assert k in c.nodes["d"].objects
    c.mw_open("b", "mm", key, False, then_call=("bump", 1))  # into b's replica, for d
    c.deliver_all()
    assert c.nodes["b"].replicas[k][1] == "d"
    c.remove("b", "mm", key)
    c.deliver_all()
    c.mw_open("b", "mm", key, True, then_call=("bump", 2))  # made again, at b
    c.deliver_all()
    c.check()
    assert k in c.nodes["b"].objects
    end(c)
    second = next(op.id for op in c.ops if op.name == "bump" and op.arg == 2)
    assert [op_id for _, op_id in c.nodes["b"].objects[k].obj.log] == [second]


def test_a_call_waiting_for_a_fence_comes_after_this_nodes_replica() -> None:
    """Per-caller order between a node's replica and its blocking call that waits for a
    fence (``--hypothesis-seed=125``).  The object is evacuated to c while c's fence to the
    leaver is out, so it waits aside; c finds it at c, makes an untethered update (into
    c's replica, made for c) and then a blocking call, which waits for the fence.  The
    replica was folded only when the object was installed, queued behind the blocking
    call ("c's call #2 applied after #3").  Fixed in ``ObjectLayer.invoke``: a call that
    waits for a fence takes this node's replica out first, queued ahead of it (without
    the ``_send_fold`` before that ``_fence`` this test fails)."""
    c, key = leaving(["a", "b", "c"], "a", "mm", to="c")
    k = ("mm", key)
    c.mw_open("a", "mm", key, True)
    c.deliver_all()
    c.mw_open("c", "mm", key, False)
    c.deliver_all()
    c.mw_call(len(c.mw_refs) - 1, "bump", 1)  # into c's replica, for a...
    c.flush("c")  # ...folded to a: c's numbered messages went there
    c.deliver_all()
    ref = found_at_c_while_fencing(c, "mm", key)
    c.mw_call(ref, "bump", 2)  # into c's replica, for c
    c.mw_call(ref, "add", 3)  # waits for the fence
    end(c)
    calls = [op.id for op in c.ops if op.name in ("add", "bump")]
    assert [op_id for _, op_id in c.nodes["c"].objects[k].obj.log] == calls


def test_calls_parked_for_an_object_removed_on_its_way_are_answered() -> None:
    """Calls parked for an object that is removed before it is installed (the scaling
    simulation's ``--hypothesis-seed=190``: "calls wait only for an object that may
    come").  The object is evacuated to c while c's fence to the leaver is out, so it
    waits aside; b finds it at c and calls it there: the call is parked until the object
    is installed; then a remove drops the waiting object, and the parked call waited for
    the fence to come back to be refused.  Fixed in ``ObjectLayer._on_drop``: dropping an
    object still arriving hands what was parked for it on (the call meets a removed
    object; without that ``_unpark`` this test fails)."""
    c, key = leaving(["a", "b", "c"], "a", "mw", to="c")
    k = ("mw", key)
    c.mw_open("a", "mw", key, True)
    c.deliver_all()
    c.mw_open("c", "mw", key, False, then_call=("bump", 1))  # c's call goes to a
    c.deliver_all()
    scale_in(c, "a")
    c.drain("a", 10)
    while any(isinstance(msg, (Evacuate, Evacuates)) for msg in c.queues[("a", "c")]):
        c.deliver(("a", "c"))  # the object waits at c for c's fence, sent to a
    assert k in c.nodes["c"].router.objects._arriving
    c.mw_open("b", "mw", key, True)  # b finds it at c
    deliver_all_but(c, ("a", "c"))
    ref = len(c.mw_refs) - 1
    assert c.mw_refs[ref].owner == "c"
    calling = c.mw_call(ref, "add", 2)
    deliver_all_but(c, ("a", "c"))
    assert k in c.nodes["c"].router.objects._parked  # the call waits for the object
    removing = c.remove("c", "mw", key)  # (c owns the key: the Drop is handled at once)
    c.check()  # the invariant: calls wait only for an object that may come
    deliver_all_but(c, ("a", "c"))
    assert calling.response is not None  # answered before the fence is back
    end(c)
    assert removing.result is True


def test_an_evacuation_by_a_release_target_ends_the_release() -> None:
    """A leaver evacuates an object it was handed by a release whose notice has not reached
    the key owner yet (``--hypothesis-seed=234``).  The key owner a asked c to hand the
    object to b; c did (b holds it) but c's MOVED notice is slow; b leaves and evacuates
    the object to a.  The key owner took the evacuation for one by the old holder and sent
    the release again, to the object's new place: a handed it to b a second time, which
    did not expect it, and the object, the only copy, was dropped ("counted errors
    ['transfer-without-request']").  Fixed in ``KeyLayer._moved``: an evacuation whose
    version says the hand-over happened ends the release; the late notice is stale
    (without the ``msg.version > released_at + 1`` branch, or without the stale-notice
    check after it, this test fails)."""
    c = ObjectCluster(["a", "b", "c"], keys=16)
    after = c.ring.with_nodes((), ["b"])
    key = next(
        k
        for k in c.keys
        if c.ring.owner(key_token("sw", k)) == "a" and after.owner(key_token("sw", k)) == "a"
    )
    k = ("sw", key)
    c.sw_open("c", key, True)  # made at c
    c.deliver_all()
    c.sw_close(len(c.sw_refs) - 1)
    c.sw_open("b", key, False)  # a asks c to hand it to b
    deliver_all_but(c, ("c", "a"))  # c's MOVED notice waits
    assert k in c.nodes["b"].objects
    c.sw_close(len(c.sw_refs) - 1)
    scale_in(c, "b")
    c.drain("b", 10)  # b evacuates it to a
    deliver_all_but(c, ("c", "a"))
    end(c)
    holders = [n for n, s in c.nodes.items() if k in s.objects]
    assert holders == ["a"]
    assert c.nodes["a"].records[k].owner == "a"  # (the late notice named b: stale)
