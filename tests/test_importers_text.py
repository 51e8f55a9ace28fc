"""TextImporter and chunking on document fixtures of each format, generated here."""
from __future__ import annotations

import io
import json

import pytest

from idletune.examples import Source
from idletune.importers import ImportFailed, TextImportConfig, TextImporter, chunk_text, estimate_tokens
from idletune.importers.config import ChunkConfig
from idletune.queue import TrainingQueue


@pytest.fixture
def queue(tmp_path):
    q = TrainingQueue(tmp_path / "queue.db")
    yield q
    q.close()


def texts(queue) -> str:
    return "\n".join(e.text for e in queue.recent(1000) if e.kind == "text")


def chats(queue) -> list[list[dict]]:
    return [e.messages for e in sorted(queue.recent(1000), key=lambda e: e.id) if e.kind == "chat"]


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A minimal valid PDF (Helvetica text, one content stream per page), built by hand."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    n = len(pages)
    objs = ["<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        ops = " ".join(f"({esc(line)}) Tj T*" for line in text.split("\n")) if text else ""
        stream = f"BT /F1 12 Tf 16 TL 72 720 Td {ops} ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>")
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    if title:
        objs.append(f"<< /Title ({esc(title)}) >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    info = f" /Info {len(objs)} 0 R" if title else ""
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def make_docx() -> bytes:
    import docx

    d = docx.Document()
    d.core_properties.title = "Zorblax field guide"
    d.add_heading("Zorblax field guide", level=1)
    d.add_paragraph("Zorblaxes are small blue creatures of the Quellian mountains.")
    d.add_heading("Feeding", level=2)
    d.add_paragraph("They eat moss in summer and quellberries in autumn.")
    table = d.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Season", "Food"
    table.cell(1, 0).text, table.cell(1, 1).text = "Winter", "Lichen"
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


# ---- documents ---------------------------------------------------------------------------------
def test_plain_text_and_dedup(queue):
    imp = TextImporter(queue)
    first = imp.import_text("Zorblaxes sing at dawn.\r\n\r\n\r\n\r\nThey hum in groups of seven.\x07", name="notes")
    assert first.examples_added == 1 and first.metadata["format"] == "text"
    assert queue.recent(1)[0].text == "Zorblaxes sing at dawn.\n\nThey hum in groups of seven."
    assert queue.recent(1)[0].source == Source.TEXT and queue.recent(1)[0].metadata["file"] == "notes"
    again = imp.import_text("Zorblaxes sing at dawn.\n\nThey hum in groups of seven.")
    assert again.examples_added == 0 and again.duplicates == 1 and queue.size() == 1


def test_markdown_cleaned_and_chunked_along_headings(queue):
    sections = "\n\n".join(f"## Section {i}\n\n" + " ".join(f"Fact {i}.{j} about zorblaxes is long enough."
                                                             for j in range(12)) for i in range(4))
    md = f"---\ntitle: Field notes\n---\n# Zorblax notes\n\nSee [the wiki](http://x.test/wiki) ![a photo](p.png).\n\n{sections}"
    result = TextImporter(queue, TextImportConfig(chunk=ChunkConfig(max_tokens=120, overlap_tokens=20))) \
        .import_text(md, name="notes.md")
    assert result.metadata["format"] == "markdown" and result.metadata["title"] == "Field notes"
    ex = sorted(queue.recent(100), key=lambda e: e.id)
    assert len(ex) == result.examples_added > 4
    joined = "\n".join(e.text for e in ex)
    assert "http://x.test" not in joined and "See the wiki a photo." in joined and "title:" not in joined
    # Every chunk that continues a section starts with its heading; every fact survives.
    for e in ex:
        if e.metadata.get("section", "").startswith("Section"):
            assert e.text.startswith("## " + e.metadata["section"])
        assert estimate_tokens(e.text) <= 120
    for i in range(4):
        for j in range(12):
            assert f"Fact {i}.{j} " in joined


def test_html_file(queue, tmp_path):
    html = ("<html><head><title>Diet</title></head><body><nav><a href='/'>Home</a> <a href='/x'>Menu item</a></nav>"
            "<article><h1>Zorblax diet</h1><p>" + "A Zorblax eats three hundred grams of moss every day. " * 6
            + "</p></article><footer>Copyright footer text</footer></body></html>")
    path = tmp_path / "diet.htm"
    path.write_text(html)
    result = TextImporter(queue).import_file(path)
    assert result.metadata["format"] == "html" and result.metadata["file"] == "diet.htm"
    assert result.metadata["title"] in ("Diet", "Zorblax diet")
    assert "three hundred grams" in texts(queue) and "Menu item" not in texts(queue)
    assert "Copyright footer" not in texts(queue)


def test_pdf(queue, tmp_path):
    path = tmp_path / "guide.pdf"
    path.write_bytes(make_pdf(["Zorblax eggs hatch after forty days.\nThe nest is lined with moss.", "",
                               "Adults weigh about two kilograms."], title="Zorblax guide"))
    progress = []
    result = TextImporter(queue).import_file(path, progress=lambda d, t: progress.append((d, t)))
    assert result.metadata["format"] == "pdf" and result.metadata["pages"] == 3
    assert result.metadata["title"] == "Zorblax guide"
    assert ("page 2", "no text layer (a scanned page? import it as an image for OCR)") in result.skipped
    body = texts(queue)
    assert "eggs hatch after forty days" in body and "two kilograms" in body
    assert {e.metadata["page"] for e in queue.recent(10)} == {1, 3}
    assert (3, 3) in progress


def test_docx(queue, tmp_path):
    path = tmp_path / "guide.docx"
    path.write_bytes(make_docx())
    result = TextImporter(queue).import_file(path)
    assert result.metadata["format"] == "docx" and result.metadata["title"] == "Zorblax field guide"
    body = texts(queue)
    assert "# Zorblax field guide" in body and "## Feeding" in body
    assert "quellberries in autumn" in body and "Winter | Lichen" in body


def test_csv_rows_as_text_and_chat_columns(queue):
    imp = TextImporter(queue)
    result = imp.import_text("name,colour,food\nzorblax,blue,moss\nquellbird,red,\"berries, seeds\"\nbroken,row\n",
                             format="csv", name="animals.csv")
    assert result.metadata["format"] == "csv" and ("row 4", "has 2 fields, the header has 3") in result.skipped
    assert "name: quellbird\ncolour: red\nfood: berries, seeds" in texts(queue)
    result = imp.import_text("question;answer\nWhat colour is a zorblax?;Blue.\nHow long do eggs take?;Forty days.\n",
                             name="qa.csv", format="csv")
    assert result.examples_added == 2 and result.metadata["dataset"] == "csv chat columns"
    assert chats(queue)[-1] == [{"role": "user", "content": "How long do eggs take?"},
                                {"role": "assistant", "content": "Forty days."}]


def test_json_without_chat_structure_is_text(queue):
    data = {"animal": "zorblax", "facts": {"colour": "blue", "eats": ["moss", "quellberries"]}}
    result = TextImporter(queue).import_text(json.dumps(data), name="facts.json")
    assert result.metadata["format"] == "json" and result.metadata["dataset"] is None
    assert "animal: zorblax\nfacts:\n  colour: blue\n  eats:\n    - moss\n    - quellberries" in texts(queue)


# ---- chat datasets -----------------------------------------------------------------------------
def test_openai_jsonl_one_example_per_assistant_turn(queue, tmp_path):
    lines = [
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Colour?"},
                      {"role": "assistant", "content": "Blue.", "weight": 0}, {"role": "user", "content": "Food?"},
                      {"role": "assistant", "content": [{"type": "text", "text": "Moss."}]}]},
        {"messages": [{"role": "user", "content": "Weather in Quellia?"},
                      {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                      {"role": "tool", "content": "cold"}, {"role": "assistant", "content": "Cold."}]},
        {"messages": [{"role": "user", "content": "unanswered"}]},
        {"something": "else"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    result = TextImporter(queue).import_file(path)
    assert result.metadata["format"] == "jsonl" and result.metadata["dataset"] == "openai"
    assert result.examples_added == 2  # the weight-0 turn is context only
    got = chats(queue)
    assert got[0] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Colour?"},
                      {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Food?"},
                      {"role": "assistant", "content": "Moss."}]
    assert got[1] == [{"role": "user", "content": "Weather in Quellia?"}, {"role": "assistant", "content": "Cold."}]
    skipped = dict(result.skipped)
    assert "tool/function" in skipped["line 2"] and "no assistant turn" in skipped["line 3"]
    assert "not a chat record" in skipped["line 4"]
    assert queue.recent(1)[0].source == Source.DATASET
    assert TextImporter(queue).import_file(path).examples_added == 0


def test_sharegpt_and_alpaca(queue):
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                   {"from": "human", "value": "What is a zorblax?"},
                                   {"from": "gpt", "value": "A blue creature."}]}]
    result = TextImporter(queue).import_text(json.dumps(sharegpt), name="sharegpt.json")
    assert result.metadata["dataset"] == "sharegpt" and result.examples_added == 2
    assert chats(queue)[1][-1] == {"role": "assistant", "content": "A blue creature."}
    assert len(chats(queue)[1]) == 4
    alpaca = [{"instruction": "Translate to French", "input": "blue", "output": "bleu"},
              {"instruction": "Name a moss eater", "input": "", "output": "The zorblax."},
              {"instruction": "Empty", "input": "", "output": ""}]
    result = TextImporter(queue).import_text(json.dumps(alpaca))
    assert result.metadata["dataset"] == "alpaca" and result.examples_added == 2
    assert chats(queue)[2] == [{"role": "user", "content": "Translate to French\n\nblue"},
                               {"role": "assistant", "content": "bleu"}]
    assert dict(result.skipped)["record 3"] == "no assistant turn to learn after a user message"


def test_chatgpt_export_follows_current_branch(queue, tmp_path):
    def node(i, parent, children, role=None, text=None, **extra):
        msg = None if role is None else {"author": {"role": role}, "content": {"content_type": "text", "parts": [text]},
                                         **extra}
        return {"id": i, "parent": parent, "children": children, "message": msg}

    conv = {"title": "Zorblax chat", "current_node": "a2", "mapping": {
        "root": node("root", None, ["sys"]),
        "sys": node("sys", "root", ["u1"], "system", ""),
        "u1": node("u1", "sys", ["a1_old", "a1"], "user", "What do zorblaxes eat?"),
        "a1_old": node("a1_old", "u1", [], "assistant", "I don't know (regenerated away)."),
        "a1": node("a1", "u1", ["u2"], "assistant", "Moss."),
        "u2": node("u2", "a1", ["a2"], "user", "And in autumn?"),
        "a2": node("a2", "u2", [], "assistant", "Quellberries."),
    }}
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps([conv]))
    result = TextImporter(queue).import_file(path)
    assert result.metadata["dataset"] == "chatgpt_export" and result.examples_added == 2
    got = chats(queue)
    assert got[1] == [{"role": "user", "content": "What do zorblaxes eat?"}, {"role": "assistant", "content": "Moss."},
                      {"role": "user", "content": "And in autumn?"}, {"role": "assistant", "content": "Quellberries."}]
    assert "regenerated away" not in json.dumps(got)
    assert queue.recent(1)[0].metadata["title"] == "Zorblax chat"


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data, name, code, words", [
    (b"caf\xe9 au lait", "menu.txt", "invalid_encoding", "not valid UTF-8: byte 3 (line 1)"),
    (b"ok text \xe2\x82", "cut.txt", "invalid_encoding", "truncated"),
    (b'[{"messages": [{"role": "user", "content": "hi"}', "cut.json", "corrupt_file", "truncated"),
    (b'{"messages": []}\n{"messages": [{"ro', "cut.jsonl", "corrupt_file", "line 2"),
    (b"this is not a pdf", "report.pdf", "corrupt_file", "named .pdf"),
    (b"plain words", "letter.docx", "corrupt_file", "named .docx"),
    (b"PK\x03\x04 truncated zip", "broken.docx", "corrupt_file", "corrupt or truncated"),
    (b"\x7fELF\x02\x01\x01" + b"\x00" * 20, "program.txt", "unsupported_format", "program"),
    (b"\x00\x01\x02\x03binary", "blob.txt", "unsupported_format", "binary"),
    (b"  \n\n ", "blank.md", "empty", "empty"),
    (b'a,b\n"unterminated,1\n', "bad.csv", "corrupt_file", "not valid CSV"),
    (b"\x89PNG\r\n\x1a\n....", "pic.txt", "unsupported_format", "image"),
])
def test_bad_files_are_clear_and_add_nothing(queue, data, name, code, words):
    with pytest.raises(ImportFailed) as e:
        TextImporter(queue).import_bytes(data, name)
    assert e.value.code == code and words in str(e.value) and name in str(e.value)
    assert queue.size() == 0


def test_truncated_pdf_and_docx(queue):
    pdf = make_pdf(["Some text on a page."])
    with pytest.raises(ImportFailed, match="truncated PDF"):
        TextImporter(queue).import_bytes(pdf[: len(pdf) // 2], "half.pdf")
    docx_bytes = make_docx()
    with pytest.raises(ImportFailed, match="corrupt or truncated"):
        TextImporter(queue).import_bytes(docx_bytes[: len(docx_bytes) - 100], "half.docx")
    assert queue.size() == 0


def test_wrong_extension_is_read_by_content(queue):
    result = TextImporter(queue).import_bytes(make_pdf(["Zorblaxes are blue."]), "notes.txt")
    assert result.metadata["format"] == "pdf" and "named .txt but is a PDF" in result.warnings[0]
    result = TextImporter(queue).import_bytes(b'{"a": 1}\n{"a": 2}\n', "records.json")
    assert result.metadata["format"] == "jsonl" and "JSON Lines" in result.warnings[0]


def test_limits_and_arguments(queue, tmp_path):
    small = TextImporter(queue, TextImportConfig(max_bytes=100))
    with pytest.raises(ImportFailed) as e:
        small.import_text("x" * 101)
    assert e.value.code == "too_large" and e.value.http_status == 413
    few = TextImporter(queue, TextImportConfig(max_examples=2))
    with pytest.raises(ImportFailed, match="more than 2 examples"):
        few.import_text(json.dumps([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]))
    with pytest.raises(ImportFailed, match="unknown format"):
        TextImporter(queue).import_text("hi", format="rtf")
    with pytest.raises(ImportFailed, match="no such file"):
        TextImporter(queue).import_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="overlap_tokens"):
        ChunkConfig(max_tokens=100, overlap_tokens=90)
    assert queue.size() == 0


# ---- chunking ----------------------------------------------------------------------------------
def test_chunking_budget_overlap_and_counter():
    words = " ".join(f"word{i}." for i in range(400))
    calls = []

    def count(s: str) -> int:  # one token per whitespace-separated word
        calls.append(s)
        return len(s.split())

    chunks = chunk_text(f"# Title\n\n{words}", max_tokens=50, overlap_tokens=10, count_tokens=count)
    assert calls and all(c.tokens <= 50 and len(c.text.split()) <= 50 for c in chunks)
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.text.startswith("# Title")
        tail = prev.text.split()[-3:]
        assert " ".join(tail) in nxt.text  # overlap carried over
    seen = " ".join(c.text for c in chunks)
    assert all(f"word{i}." in seen for i in range(400))
    assert chunk_text("") == [] and chunk_text("   \n\n") == []
    assert len(chunk_text("a" * 10_000, max_tokens=100)) >= 25  # an unbreakable word is still cut
    small_sections = "# A\n\none.\n\n# B\n\ntwo.\n\n# C\n\nthree."
    assert len(chunk_text(small_sections, max_tokens=100)) == 1  # small sections share a chunk
    assert [c.section for c in chunk_text(small_sections, max_tokens=6, overlap_tokens=0)] == ["A", "B", "C"]
    code = "```\nline one\n\nline two\n```"
    assert chunk_text(code)[0].text == code  # fenced code is not split at its blank line


def test_estimate_tokens():
    assert estimate_tokens("") == 0
    assert 9 <= estimate_tokens("The quick brown fox jumps over the lazy dog.") <= 16
    assert estimate_tokens("你好世界") == 4
