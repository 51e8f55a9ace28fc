from idletune.collect import DataCollector
from idletune.examples import Priority, Status
from idletune.queue import TrainingQueue


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


def make(tmp_path, **kw):
    q = TrainingQueue(tmp_path / "queue.db")
    return q, DataCollector(q, enable_chat_logging=True, enable_web_scraping=True,
                            enable_content_processing=True, auto_collect=True, **kw)


def test_resent_history_is_stored_once(tmp_path):
    q, c = make(tmp_path)
    c.log_exchange([u("What is 2+2?")], "4", generation_id="g1", version=0)
    c.log_exchange([u("What is 2+2?"), a("4"), u("And 3+3?")], "6", generation_id="g2", version=0)
    c.log_exchange([u("What is 2+2?"), a("4"), u("And 3+3?"), a("6"), u("Thanks!")], "You're welcome", generation_id="g3", version=0)
    pairs = [e for e in q.pending(100) if e.source == "chat"]
    assert len(pairs) == 3  # one per (context -> assistant turn), not one per resend
    assert q.get_stats()["by_priority"]["high"] == 0


def test_edited_assistant_turn_is_a_high_priority_correction(tmp_path):
    q, c = make(tmp_path)
    c.log_exchange([u("Who leads Project Owl?")], "I don't know.", generation_id="g1", version=0)
    res = c.log_exchange([u("Who leads Project Owl?"), a("Project Owl is led by Dr. Mira Tam."), u("Thanks")],
                         "You're welcome.", generation_id="g2", version=0)
    assert res.corrections == 1
    corr = [e for e in q.pending(100) if e.source == "correction"]
    assert len(corr) == 3 and all(e.priority == Priority.HIGH for e in corr)  # as asked, and two rewordings
    assert {e.messages[-1]["content"] for e in corr} == {"Project Owl is led by Dr. Mira Tam."}
    assert [e.messages[0]["content"] for e in corr if not e.metadata.get("augmented")] == ["Who leads Project Owl?"]
    assert q.pending(1)[0].source == "correction"  # trains first
    wrong = [e for e in q.recent(100) if e.messages and e.messages[-1]["content"] == "I don't know."][0]
    assert wrong.status == Status.REJECTED and wrong.reason == "corrected by the user"


def test_feedback_correction_and_ratings(tmp_path):
    q, c = make(tmp_path)
    c.log_exchange([u("Capital of Atlantis?")], "Paris.", generation_id="g1", version=0)
    c.log_exchange([u("Say hi")], "Hi!", generation_id="g2", version=0)
    c.add_correction([u("Capital of Atlantis?"), a("Paris.")], "The capital of Atlantis is Poseidonis.")
    high = [e for e in q.pending(100) if e.priority == Priority.HIGH]
    assert {e.messages[-1]["content"] for e in high} == {"The capital of Atlantis is Poseidonis."}
    assert len(high) == 3
    assert [e for e in q.recent(100) if e.messages and e.messages[-1]["content"] == "Paris."][0].status == Status.REJECTED
    c.log_exchange([u("Tell me a joke")], "No.", generation_id="g3", version=0)
    c.rate("g3", -1)
    bad = [e for e in q.recent(100) if e.metadata.get("generation_id") == "g3"][0]
    assert bad.status == Status.REJECTED and "rated down" in bad.reason
    c.rate("g2", 1)
    good = [e for e in q.recent(100) if e.messages and e.messages[-1]["content"] == "Hi!"][0]
    assert good.priority == Priority.HIGH


def test_asked_again_after_a_correction_the_answer_is_not_queued(tmp_path):
    """Before the model has learned a correction, asking the same question again gets the wrong
    answer again; queued, it would train against the correction in the same round."""
    q, c = make(tmp_path)
    c.log_exchange([u("Who runs Quillby?")], "Quillby is a game.", generation_id="g1", version=0)
    c.add_correction([u("Who runs Quillby?")], "Quillby is run by Mayor Ottoline Brask.")
    res = c.log_exchange([u("Who runs Quillby?")], "Quillby is an online game.", generation_id="g2", version=0)
    assert res.superseded and res.queued == 0
    answers = {e.messages[-1]["content"] for e in q.pending(100) if e.kind == "chat"}
    assert answers == {"Quillby is run by Mayor Ottoline Brask."}  # the correction (and its rewordings) only
    assert c.get_stats()["answers_superseded"] == 1
    # a thumbs-up on such an answer: the user vouches for it, so it is queued after all
    good = c.log_exchange([u("Who runs Quillby?")], "Mayor Ottoline Brask runs Quillby.", generation_id="g2b", version=1)
    assert good.superseded and good.queued == 0
    rated = c.rate("g2b", 1)
    ex = q.get(rated["example_id"])
    assert ex.priority == Priority.HIGH and ex.messages[-1]["content"] == "Mayor Ottoline Brask runs Quillby."
    assert c.rate("g2", -1)["example_id"] is None  # rated down: it stays out
    # other questions are queued as before; a correction found in a resent history counts too,
    # and both are remembered across restarts (the chat log is a file)
    c.log_exchange([u("Who leads Project Owl?")], "I don't know.", generation_id="g3", version=0)
    c.log_exchange([u("Who leads Project Owl?"), a("Dr. Mira Tam."), u("Thanks")], "You're welcome.",
                   generation_id="g4", version=0)
    q2, c2 = make(tmp_path)
    assert c2.log_exchange([u("Who leads Project Owl?")], "Nobody.", generation_id="g5", version=1).superseded
    assert c2.log_exchange([u("Who runs Quillby?")], "A company.", generation_id="g6", version=1).superseded
    later = c2.log_exchange([u("Who runs Quillby?"), a("Quillby is run by Mayor Ottoline Brask."),
                             u("Since when?")], "Since 2019.", generation_id="g7", version=1)
    assert not later.superseded and later.corrections == 0  # the known correction, resent, is not new
    assert "Since 2019." in {e.messages[-1]["content"] for e in q2.pending(100) if e.kind == "chat"}


def test_corrections_queued_before_they_were_remembered_count(tmp_path):
    """A data directory from an older version: its queue holds corrections, its chat log no
    record of them; the collector fills the record at start."""
    from idletune.collect import correction_examples

    q, _ = make(tmp_path)
    q.add_many(correction_examples([u("Who runs Quillby?")], "Quillby is run by Mayor Ottoline Brask.", "conv-1"))
    (tmp_path / "chatlog.db").unlink()  # as if written before the chat log kept the record
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"chatlog.db{suffix}").unlink(missing_ok=True)
    q2, c2 = make(tmp_path)
    assert c2.log_exchange([u("Who runs Quillby?")], "A company.", generation_id="g1", version=0).superseded
    assert not c2.log_exchange([u("Please answer this: Who runs Quillby?")], "A company.", generation_id="g2",
                               version=0).superseded  # rewordings are the collector's, not the user's


def test_a_correction_sent_again_trains_again(tmp_path):
    """After a rollback took a learned correction out of the weights (or the gate refused it),
    sending it again must teach it again, not count as a duplicate of what was done."""
    q, c = make(tmp_path)
    first = c.add_correction([u("Who runs Quillby?")], "Quillby is run by Mayor Ottoline Brask.")
    q.record_attempt([first])
    q.mark_trained([e.id for e in q.pending(100)])
    assert q.pending_count() == 0
    again = c.add_correction([u("Who runs Quillby?")], "Quillby is run by Mayor Ottoline Brask.")
    assert again == first
    pending = q.pending(100)
    assert len(pending) == 3 and all(e.source == "correction" for e in pending)  # with its rewordings
    assert q.record_attempt([first])[first] == 1  # attempts counted afresh


def test_a_trained_answer_corrected_or_rated_down_is_no_longer_replayed(tmp_path):
    """A wrong answer that already trained is replayed in later rounds (trained examples keep
    old lessons): corrected or rated down, it is withdrawn too, or it would fight the correction."""
    q, c = make(tmp_path)
    c.log_exchange([u("Who runs Quillby?")], "Quillby is a game.", generation_id="g1", version=0)
    c.log_exchange([u("Tell me a joke")], "No.", generation_id="g2", version=0)
    q.mark_trained([e.id for e in q.pending(100)])
    c.add_correction([u("Who runs Quillby?"), a("Quillby is a game.")], "Quillby is run by Mayor Ottoline Brask.")
    c.rate("g2", -1)
    wrong = {e.messages[-1]["content"]: e for e in q.recent(100) if e.kind == "chat"}
    assert wrong["Quillby is a game."].status == Status.REJECTED
    assert wrong["Quillby is a game."].reason == "corrected by the user"
    assert wrong["No."].status == Status.REJECTED and wrong["No."].reason == "rated down by the user"
    assert not q.sample(Status.TRAINED, 100)  # nothing left to replay


def test_a_correction_the_full_queue_refused_does_not_hold_answers_back(tmp_path):
    import pytest

    from idletune.queue import QueueFullError, TrainingQueue

    q = TrainingQueue(tmp_path / "queue.db", max_examples=2)
    c = DataCollector(q)
    with pytest.raises(QueueFullError):
        c.add_correction([u("Who runs Quillby?")], "Quillby is run by Mayor Ottoline Brask.")  # 3 examples
    assert not c.log_exchange([u("Who runs Quillby?")], "A company.", generation_id="g1", version=0).superseded


def test_statements_become_text_and_links_are_imported(tmp_path):
    seen = []
    q, c = make(tmp_path, import_url=lambda url: seen.append(url) or "job1")
    c.log_exchange([u("Our team standup moved to 9:30 every Tuesday in room Kepler.")], "Noted.",
                   generation_id="g1", version=0)
    c.log_exchange([u("What time is standup?")], "9:30", generation_id="g2", version=0)
    c.log_exchange([u("Please read https://example.org/notes.html and remember it.")], "OK",
                   generation_id="g3", version=0)
    texts = [e.text for e in q.pending(100) if e.kind == "text"]
    assert texts == ["Our team standup moved to 9:30 every Tuesday in room Kepler."]
    assert seen == ["https://example.org/notes.html"]


def test_switches_do_what_they_say(tmp_path):
    q = TrainingQueue(tmp_path / "queue.db")
    c = DataCollector(q, enable_chat_logging=False, enable_web_scraping=False,
                      enable_content_processing=False, auto_collect=False, import_url=lambda u: 1 / 0)
    c.log_exchange([u("The office wifi password is tangerine-42 for guests.")], "OK", generation_id="g", version=0)
    assert q.size() == 0 and c.get_stats()["chat_log_messages"] == 0
    c.log_message("conv", "user", "hello")  # logging off: nothing kept
    assert c.get_stats()["chat_log_messages"] == 0
