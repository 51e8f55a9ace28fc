"""run_import: the CLI helper behind `idletune import`."""
from __future__ import annotations

import io
import json

from idletune.importers import run_import
from idletune.queue import TrainingQueue


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_summary_lines_progress_and_exit_codes(tmp_path):
    queue = TrainingQueue(tmp_path / "q.db")
    notes = tmp_path / "notes.md"
    notes.write_text("# Zorblax\n\n" + "\n\n".join(f"Fact {i}: zorblaxes hum at dawn." for i in range(200)))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}))
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"nope")
    out = Terminal()
    code = run_import([str(notes), str(chats), str(bad), str(tmp_path / "missing.txt"), "http://10.0.0.1/",
                       "ftp://example.org/x.txt"], queue, out=out)
    assert code == 1
    lines = [ln.strip("\r ") for ln in out.getvalue().split("\n") if ln.strip()]
    summaries = [ln.split("\r")[-1].strip() for ln in lines]
    assert summaries[0].startswith(f"imported {notes}: ") and "markdown" in summaries[0]
    assert summaries[1].startswith(f"imported {chats}: 1 example added")
    assert summaries[2].startswith(f"failed   {bad}: ") and "named .pdf" in summaries[2]
    assert summaries[3].startswith("failed") and "no such file" in summaries[3]
    assert summaries[4].startswith("failed") and "allow_hosts" in summaries[4]
    # another scheme is a URL too, not a file name (whose path it would mangle)
    assert summaries[5].startswith("failed   ftp://example.org/x.txt: only http:// and https:// URLs"), summaries[5]
    assert len(summaries) == 6
    assert "] " in out.getvalue() and "#" in out.getvalue()  # a progress bar was drawn on the terminal
    plain = io.StringIO()
    assert run_import([str(notes)], queue, out=plain) == 0
    assert "already queued" in plain.getvalue() and "[" not in plain.getvalue().split(":")[0]
    assert run_import([], queue, out=io.StringIO()) == 2
    queue.close()
