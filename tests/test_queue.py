import os
import signal
import subprocess
import sys
import textwrap

import pytest

from idletune.examples import Priority, Status, TrainingExample
from idletune.queue import QueueFullError, TrainingQueue


def pair(q: str, a: str, **kw) -> TrainingExample:
    return TrainingExample.chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}], **kw)


def test_dedup_keeps_one_copy_and_raises_priority(tmp_path):
    q = TrainingQueue(tmp_path / "q.db")
    first = q.add(pair("hi", "hello"))
    assert first is not None
    assert q.add(pair("hi", "hello")) is None  # a client resending history
    assert q.add(pair(" hi", "hello ")) is None  # whitespace at the ends does not make it new
    assert q.size() == 1
    q.add(pair("hi", "hello", priority=Priority.HIGH, source="correction"))
    ex = q.get(first)
    assert ex.priority == Priority.HIGH and ex.source == "correction"


def test_priority_order_and_stats(tmp_path):
    q = TrainingQueue(tmp_path / "q.db", heldout_percent=0)
    q.add(TrainingExample.from_text("an imported paragraph about owls"))
    q.add(pair("a", "b"))
    q.add(pair("c", "d", priority="high", source="correction"))
    kinds = [e.priority for e in q.pending(10)]
    assert kinds == [Priority.HIGH, Priority.NORMAL, Priority.LOW]
    stats = q.get_stats()
    assert stats["total"] == 3
    assert stats["by_priority"] == {"low": 1, "normal": 1, "high": 1}
    assert stats["by_source"] == {"text": 1, "chat": 1, "correction": 1}
    assert stats["by_status"]["pending"] == 3
    q.mark_trained([e.id for e in q.pending(10)])
    assert q.get_stats()["by_status"]["trained"] == 3 and q.pending_count() == 0


def test_corrections_train_in_rounds_of_their_own(tmp_path):
    """Mixed with long imported chunks, a correction got few of a round's slow steps and was not
    learned; high-priority examples make a round of their own, then the usual mix resumes
    (priority first, a quarter of the places for the oldest lower-priority examples); a round
    the gate rejected comes back as two rounds, its halves."""
    from idletune.config import TrainingConfig
    from idletune.training.batching import BatchManager

    q = TrainingQueue(tmp_path / "q.db", heldout_percent=0)
    q.add_many([TrainingExample.from_text(f"imported chunk {i} about harbours and ferries") for i in range(10)])
    q.add_many([pair(f"question {i}", f"answer {i}") for i in range(20)])
    q.add_many([pair(f"Who runs town {i}?", f"Mayor {i}.", priority="high", source="correction") for i in range(3)])
    bm = BatchManager(TrainingConfig(), round_size=16)
    first = bm.select_round(q)
    assert [e.source for e in first] == ["correction"] * 3
    q.mark_trained([e.id for e in first])
    second = bm.select_round(q)
    assert len(second) == 16 and [e.priority for e in second].count(Priority.LOW) == 4  # nothing starves
    assert [e.priority for e in second][:12] == [Priority.NORMAL] * 12
    # a rejected round is tried again in halves, higher priority first; a correction that comes
    # meanwhile goes before them; a half stays first in line until a round of it is decided
    assert bm.round_decided(second, accepted=False, again=second)
    late = q.add(pair("Who runs Quillby?", "Mayor Ottoline Brask.", priority="high", source="correction"))
    assert [e.id for e in bm.select_round(q)] == [late]
    q.mark_trained([late])
    bm.round_decided([q.get(late)], accepted=True)
    first_half = [e.id for e in bm.select_round(q)]
    assert [e.id for e in bm.select_round(q)] == first_half  # a request preempted it: the same half again
    bm.round_decided([q.get(i) for i in first_half], accepted=True)
    second_half = bm.select_round(q)
    assert first_half + [e.id for e in second_half] == [e.id for e in second]  # already in priority order
    assert len(first_half) == 8 and len(second_half) == 8 and second_half[-1].priority == Priority.LOW
    # rejected again with one example left to try: it trains alone, not back in a round of sixteen
    assert not bm.round_decided(second_half, accepted=False, again=second_half[:1])
    assert [e.id for e in bm.select_round(q)] == [second_half[0].id]
    bm.round_decided(second_half[:1], accepted=True)
    # what cannot be learned at once (a long answer rated up) has three rounds to itself, then a mixed one
    stuck = q.add(pair("Tell me everything.", "A very long answer.", priority="high", source="feedback"))
    for _ in range(3):
        assert [e.id for e in bm.select_round(q)] == [stuck]
        bm.round_decided([q.get(stuck)], accepted=True)
    mixed = bm.select_round(q)
    assert mixed[0].id == stuck and len(mixed) == 16 and mixed[-1].priority == Priority.LOW
    bm.round_decided(mixed, accepted=True)
    assert [e.id for e in bm.select_round(q)] == [stuck]


def test_a_rounds_outcome_leaves_examples_withdrawn_meanwhile_withdrawn(tmp_path):
    """A round takes pending examples; while it trains the user corrects one of its answers,
    which withdraws it. Marking the round's examples trained (or refused) afterwards must not
    bring it back: trained examples are replayed in later rounds."""
    q = TrainingQueue(tmp_path / "queue.db")
    ids = [q.add(pair(f"Q{i}?", f"A{i}.")) for i in range(3)]
    q.mark_rejected([ids[1]], "corrected by the user")
    assert q.withdrawn_among(ids) == [ids[1]]
    q.mark_trained(ids)
    q.mark_rejected(ids, "update rejected by the quality gate")  # (a later round's, say)
    assert [q.get(i).status for i in ids] == [Status.TRAINED, Status.REJECTED, Status.TRAINED]
    assert q.get(ids[1]).reason == "corrected by the user"
    q.mark_rejected([ids[0]], "rated down by the user", only_from=(Status.PENDING, Status.TRAINED))
    assert q.get(ids[0]).status == Status.REJECTED and q.get(ids[0]).reason == "rated down by the user"


def test_add_many_is_all_or_nothing(tmp_path):
    q = TrainingQueue(tmp_path / "q.db", max_examples=2)
    q.add(pair("a", "b"))
    with pytest.raises(QueueFullError, match="full"):
        q.add_many([pair("c", "d"), pair("e", "f")])
    assert q.size() == 1  # nothing of the refused batch was kept


def test_held_out_only_from_imports(tmp_path):
    q = TrainingQueue(tmp_path / "q.db", heldout_percent=50)
    r = q.add_many([TrainingExample.from_text(f"imported chunk number {i} about a topic") for i in range(40)])
    for i in range(40):
        q.add(pair(f"question {i}", f"answer {i}"))
    held = q.sample(Status.HELD_OUT, 1000)
    assert held and all(e.kind == "text" for e in held)
    assert 5 < len(held) <= 20 and r.held_out == len(held)  # at most half of what the import brought


def test_a_small_import_is_never_held_out_whole(tmp_path):
    """Held out, an import's only chunk would never be learned."""
    q = TrainingQueue(tmp_path / "q.db")  # 10 %
    texts = [f"a short note, number {i}" for i in range(400)]
    would = [t for t in texts if q._holds_out(TrainingExample.from_text(t), TrainingExample.from_text(t).content_hash)]
    assert would  # contents the hash alone would hold out
    r = q.add_many([TrainingExample.from_text(would[0])])
    assert r.held_out == 0 and q.get(r.added[0]).status == Status.PENDING
    r = q.add_many([TrainingExample.from_text(t) for t in would[1:10]])  # 9 chunks: under 10 %, none
    assert r.held_out == 0
    r = q.add_many([TrainingExample.from_text(t) for t in texts if t not in would[:10]])  # a large one: some
    assert 1 <= r.held_out <= len(r.added) // 10


def test_bad_examples_are_refused_with_reasons():
    with pytest.raises(ValueError, match="end with the assistant"):
        TrainingExample.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        TrainingExample.chat([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty"):
        TrainingExample.from_text("   ")


def test_accepted_examples_survive_kill_9(tmp_path):
    """A child process adds examples, reports each id once add() returned, then is SIGKILLed."""
    db = tmp_path / "q.db"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from idletune.examples import TrainingExample
        from idletune.queue import TrainingQueue
        q = TrainingQueue({str(db)!r})
        i = 0
        while True:
            ex = TrainingExample.chat([{{"role": "user", "content": f"q{{i}}"}}, {{"role": "assistant", "content": f"a{{i}}"}}])
            print(q.add(ex), flush=True)
            i += 1
    """)], stdout=subprocess.PIPE, text=True)
    acknowledged = [child.stdout.readline().strip() for _ in range(50)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    q = TrainingQueue(db)
    stored = {str(e.id) for e in q.pending(10_000)}
    assert set(acknowledged) <= stored


def test_corrupt_database_is_reported(tmp_path):
    from idletune.queue import QueueError

    db = tmp_path / "q.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(QueueError, match="q.db"):
        TrainingQueue(db)
