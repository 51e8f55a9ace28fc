"""ImageImporter on real images rendered with Pillow and read back with tesseract."""
from __future__ import annotations

import io
import shutil
import struct
import subprocess
import zlib

import pytest
from PIL import Image, ImageDraw, ImageFont

from idletune.examples import Source
from idletune.importers import ImageImporter, ImageImportConfig, ImportFailed
from idletune.queue import TrainingQueue

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None,
                                     reason="tesseract is not installed (scripts/setup.sh installs it)")


def _font(size: int):
    try:
        path = subprocess.run(["fc-match", "-f", "%{file}", "DejaVu Sans"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
        if path.endswith((".ttf", ".otf")):
            return ImageFont.truetype(path, size)
    except (OSError, subprocess.SubprocessError):
        pass
    return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font


def render(lines: list[str], fmt: str = "PNG", mode: str = "RGB", size=(760, 200), **save) -> bytes:
    img = Image.new(mode, size, "white" if mode != "RGBA" else (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((24, 24 + 56 * i), line, fill="black", font=_font(34))
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.fixture
def queue(tmp_path):
    q = TrainingQueue(tmp_path / "queue.db")
    yield q
    q.close()


@needs_tesseract
def test_ocr_text_becomes_chat_pair_and_text(queue, tmp_path):
    path = tmp_path / "sign.png"
    path.write_bytes(render(["The secret password", "is purple octopus 42"]))
    result = ImageImporter(queue).import_image_file(path)
    assert result.examples_added == 2 and result.metadata["format"] == "png"
    assert result.metadata["width"] == 760 and result.metadata["ocr_confidence"] > 60
    assert ("caption", "no captioning model configured (set ImageImportConfig.caption_model_dir or pass "
            "captioner=)") in result.skipped
    by_kind = {e.kind: e for e in queue.recent(10)}
    chat = by_kind["chat"]
    assert chat.messages[0]["content"] == "What does the image sign.png say?"
    answer = " ".join(chat.messages[-1]["content"].split()).lower()
    assert "secret password" in answer and "purple octopus 42" in answer
    assert "purple octopus" in by_kind["text"].text.lower() and by_kind["text"].source == Source.IMAGE
    again = ImageImporter(queue).import_image_file(path)
    assert again.examples_added == 0 and again.duplicates == 2


@needs_tesseract
def test_file_object_jpeg_with_exif_and_transparent_png(queue):
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    exif[0x0132] = "2024:05:01 10:00:00"  # DateTime
    data = render(["Quellberries are sour"], "JPEG", exif=exif.tobytes(), quality=95)
    result = ImageImporter(queue).import_image_file(io.BytesIO(data), name="berries.jpg")
    assert result.metadata["format"] == "jpeg" and result.metadata["exif"]["Make"] == "TestCam"
    assert "quellberries are sour" in queue.recent(1)[0].messages[-1]["content"].lower()
    # Black text on a transparent background must not be read as black on black.
    ImageImporter(queue).import_image_file(io.BytesIO(render(["Zorblax nests"], mode="RGBA")), name="t.png")
    texts = [e.text for e in queue.recent(10) if e.kind == "text" and e.metadata["image"] == "t.png"]
    assert len(texts) == 1 and "zorblax nests" in texts[0].lower()


class FakeDescriber:
    """A captioner over a property we can compute: the image's dominant colour."""

    def caption(self, image) -> str:
        r, g, b = image.resize((1, 1)).getpixel((0, 0))
        return "A plain red square." if r > 200 and g < 80 else "Something else."


@needs_tesseract
def test_no_text_and_no_captioner_is_an_error(queue):
    blank = io.BytesIO()
    Image.new("RGB", (300, 300), (220, 30, 30)).save(blank, "PNG")
    with pytest.raises(ImportFailed) as e:
        ImageImporter(queue).import_image_file(io.BytesIO(blank.getvalue()), name="red.png")
    assert e.value.code == "no_content" and "no text found" in str(e.value) and "captioning" in str(e.value)
    assert queue.size() == 0
    result = ImageImporter(queue, captioner=FakeDescriber()).import_image_file(io.BytesIO(blank.getvalue()),
                                                                                name="red.png")
    assert result.metadata["caption"] == "A plain red square." and result.examples_added == 1
    assert queue.recent(1)[0].messages == [{"role": "user", "content": "Describe the image red.png."},
                                            {"role": "assistant", "content": "A plain red square."}]


def test_without_tesseract_says_so(queue):
    cfg = ImageImportConfig(tesseract_cmd="/nonexistent/tesseract")
    with pytest.raises(ImportFailed) as e:
        ImageImporter(queue, config=cfg).import_image_file(io.BytesIO(render(["hello"])), name="x.png")
    assert e.value.code == "ocr_unavailable" and "tesseract" in str(e.value) and e.value.http_status == 503
    result = ImageImporter(queue, FakeDescriber(), config=cfg).import_image_file(io.BytesIO(render(["hello"])),
                                                                                   name="x.png")
    assert any("OCR is not available" in w for w in result.warnings) and result.examples_added == 1


def test_not_an_image_truncated_and_bomb(queue):
    with pytest.raises(ImportFailed, match="not an image") as e:
        ImageImporter(queue).import_image_file(io.BytesIO(b"just some text, not a picture"), name="fake.png")
    assert e.value.code == "unsupported_format"
    good = render(["truncated"])
    with pytest.raises(ImportFailed, match="corrupt or truncated") as e:
        ImageImporter(queue).import_image_file(io.BytesIO(good[: len(good) // 2]), name="half.png")
    # A tiny PNG claiming 100000 x 100000 pixels: refused from its header, never decoded.
    raw = zlib.compress(b"\x00" * 10)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    with pytest.raises(ImportFailed) as e:
        ImageImporter(queue).import_image_file(io.BytesIO(bomb), name="bomb.png")
    assert e.value.code == "too_large" and ("decompression" in str(e.value) or "too large" in str(e.value))
    with pytest.raises(ImportFailed, match="no such file"):
        ImageImporter(queue).import_image_file("/nonexistent/x.png")
    with pytest.raises(ImportFailed, match="empty"):
        ImageImporter(queue).import_image_file(io.BytesIO(b""), name="e.png")
    assert queue.size() == 0


def test_config_validation():
    with pytest.raises(ValueError, match="min_ocr_confidence"):
        ImageImportConfig(min_ocr_confidence=150)
    with pytest.raises(ValueError, match="max_pixels"):
        ImageImportConfig(max_pixels=0)
    from idletune.importers import TransformersCaptioner
    with pytest.raises(ValueError, match="config.json"):
        TransformersCaptioner("/nonexistent/model")
