"""ImageImporter: images → what they say (OCR) and, with a captioning model, what they show.

Images are opened with Pillow restricted to common formats; anything larger than
``max_pixels`` is refused before it is decoded (decompression bombs), and truncated files are
errors, never partial images. EXIF orientation is applied before OCR; a few EXIF fields (camera,
date, description; never GPS) are kept as metadata.

OCR is tesseract through pytesseract. Text whose mean word confidence is below
``min_ocr_confidence`` is treated as no text. Without tesseract, and without a captioner, the
import fails with ``code="ocr_unavailable"``: an image never becomes an empty example.

Captioning is pluggable (:class:`Captioner`: ``caption(image) -> str``).
:class:`TransformersCaptioner` runs a local image-to-text model directory; none is configured by
default (``ImageImportConfig.caption_model_dir``), and the result says so.
"""
from __future__ import annotations

import io
import re
import shutil
import struct
import threading
import warnings
from pathlib import Path, PurePath
from typing import Any, BinaryIO, Callable, Protocol, runtime_checkable

from ..examples import Priority, Source, TrainingExample
from .chunking import CountTokens, chunk_text
from .config import ImageImportConfig
from .results import ImportFailed, ImportResult

Progress = Callable[[int, int], None]
PIL_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
_EXIF_KEEP = ("ImageDescription", "Make", "Model", "DateTime", "DateTimeOriginal", "Artist", "Copyright",
              "Software", "Orientation")
_OCR_LOCK = threading.Lock()  # pytesseract keeps the program path in a module global


@runtime_checkable
class Captioner(Protocol):
    """Anything that describes an image in words."""

    def caption(self, image: Any) -> str:
        """A short description of ``image`` (a ``PIL.Image.Image``, RGB)."""
        ...


class TransformersCaptioner:
    """A captioner over a local transformers image-text-to-text model directory.

    Works with captioning models (BLIP-style: image in, caption out) and chat VLMs whose
    processor has a chat template (the image and ``prompt`` as one user turn). The model is
    loaded on the first caption, from local files only.
    """

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", max_new_tokens: int = 48,
                 prompt: str = "Describe this image in one or two sentences."):
        self.model_dir = Path(model_dir).expanduser()
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"caption model directory {self.model_dir} has no config.json; "
                             "give the directory of a saved transformers image-to-text model")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.device, self.max_new_tokens, self.prompt = device, max_new_tokens, prompt
        self._lock = threading.Lock()
        self._model = self._processor = None

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self._processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
        self._model = AutoModelForImageTextToText.from_pretrained(self.model_dir, local_files_only=True)
        self._model.to(self.device).eval()

    def caption(self, image: Any) -> str:
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            proc = self._processor
            if getattr(proc, "chat_template", None):
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
                prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
                inputs = proc(images=[image], text=prompt, return_tensors="pt")
            else:
                inputs = proc(images=image, return_tensors="pt")
            inputs = inputs.to(self.device)
            with torch.inference_mode():
                out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            if "input_ids" in inputs and out.shape[1] > inputs["input_ids"].shape[1]:
                out = out[:, inputs["input_ids"].shape[1]:]
            return proc.batch_decode(out, skip_special_tokens=True)[0].strip()


class ImageImporter:
    """Import image files: OCR text (and a caption when a captioner is set) as examples.

    Args:
        queue: the :class:`~idletune.queue.TrainingQueue` to add to.
        captioner: describes images; None uses ``config.caption_model_dir`` if set, else no captions.
        config: limits and OCR settings.
        count_tokens: token counter for chunking long OCR text.
    """

    def __init__(self, queue, captioner: Captioner | None = None, *, config: ImageImportConfig | None = None,
                 count_tokens: CountTokens | None = None):
        self.queue = queue
        self.config = config or ImageImportConfig()
        if captioner is None and self.config.caption_model_dir:
            captioner = TransformersCaptioner(self.config.caption_model_dir)
        if captioner is not None and not isinstance(captioner, Captioner):
            raise ValueError("captioner must have a caption(image) -> str method")
        self.captioner = captioner
        self.count_tokens = count_tokens

    def ocr_status(self) -> str | None:
        """None if OCR can run, else why not."""
        if shutil.which(self.config.tesseract_cmd) is None:
            return (f"OCR is not available: the tesseract program ({self.config.tesseract_cmd!r}) was not found. "
                    "Install it (Debian/Ubuntu: apt-get install tesseract-ocr; or run scripts/setup.sh)")
        try:
            import pytesseract  # noqa: F401
        except ImportError:
            return "OCR is not available: the pytesseract package is not installed (pip install pytesseract)"
        return None

    def import_image_file(self, path_or_fileobj: str | Path | BinaryIO, *, name: str | None = None,
                          progress: Progress | None = None) -> ImportResult:
        """Import one image from a path or a binary file object."""
        limit = self.config.max_bytes
        if isinstance(path_or_fileobj, (str, Path)):
            p = Path(path_or_fileobj)
            label = name or p.name
            if not p.is_file():
                raise ImportFailed(f"{p}: no such file", code="not_found", source=str(p))
            if p.stat().st_size > limit:
                raise ImportFailed(f"{label} is {p.stat().st_size / 1e6:.1f} MB, over the {limit / 1e6:.0f} MB "
                                   "image limit", code="too_large", source=label)
            data = p.read_bytes()
        else:
            label = name or PurePath(getattr(path_or_fileobj, "name", "") or "image").name
            data = path_or_fileobj.read(limit + 1)
            if not isinstance(data, bytes):
                raise ImportFailed(f"{label}: open the file in binary mode ('rb')", code="invalid_request")
        return self.import_image_bytes(data, label, progress=progress)

    def import_image_bytes(self, data: bytes, name: str, *, progress: Progress | None = None) -> ImportResult:
        """Import one image from its bytes; ``name`` is how examples refer to it."""
        if len(data) > self.config.max_bytes:
            raise ImportFailed(f"{name} is over the {self.config.max_bytes / 1e6:.0f} MB image limit",
                               code="too_large", source=name)
        if not data:
            raise ImportFailed(f"{name} is empty", code="empty", source=name)
        image, meta = self._open(data, name)  # a bad file is reported as such, whatever else is missing
        ocr_problem = self.ocr_status()
        if ocr_problem and self.captioner is None:
            raise ImportFailed(ocr_problem + "; no captioning model is configured either, so nothing can be "
                               "learned from the image", code="ocr_unavailable", source=name)
        steps = 3 if self.captioner else 2
        result = ImportResult(source=name, importer="image", metadata={"file": name, **meta})
        if progress:
            progress(1, steps)
        examples: list[TrainingExample] = []
        if ocr_problem:
            result.warnings.append(ocr_problem)
        else:
            text, confidence = self._ocr(image, name)
            result.metadata["ocr_confidence"] = confidence
            if text and confidence < self.config.min_ocr_confidence:
                result.skip("ocr", f"text found but unreliable (mean confidence {confidence:.0f} < "
                                   f"{self.config.min_ocr_confidence:.0f})")
            elif sum(ch.isalnum() for ch in text) < 2:
                result.skip("ocr", "no text found in the image")
            else:
                examples += self._ocr_examples(text, name)
        if progress:
            progress(2, steps)
        if self.captioner is None:
            result.metadata["caption"] = None
            result.skip("caption", "no captioning model configured (set ImageImportConfig.caption_model_dir "
                                   "or pass captioner=)")
        else:
            try:
                caption = (self.captioner.caption(image.convert("RGB")) or "").strip()
            except Exception as e:  # a broken model must not lose the OCR result
                caption = ""
                result.warnings.append(f"captioning failed: {type(e).__name__}: {e}")
            result.metadata["caption"] = caption or None
            if caption:
                examples.append(TrainingExample.chat(
                    [{"role": "user", "content": f"Describe the image {name}."},
                     {"role": "assistant", "content": caption}],
                    source=Source.IMAGE, priority=Priority.LOW, image=name, extracted="caption"))
            if progress:
                progress(3, steps)
        if not examples:
            why = "; ".join(f"{w}: {y}" for w, y in result.skipped + [(w, "") for w in result.warnings])
            raise ImportFailed(f"nothing to learn from {name}: {why}", code="no_content", source=name)
        result.record(examples, self.queue.add_many(examples))
        return result

    # ---- steps ----------------------------------------------------------------------------------
    def _open(self, data: bytes, name: str):
        from PIL import Image, ImageOps, UnidentifiedImageError

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise ImportFailed(f"{name} is too large to decode safely ({e})", code="too_large",
                                   source=name) from None
            except UnidentifiedImageError:
                raise ImportFailed(f"{name} is not an image that can be read (supported: "
                                   f"{', '.join(PIL_FORMATS)}; it starts with {data[:8]!r})",
                                   code="unsupported_format", source=name) from None
            except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # a header cut short
                raise ImportFailed(f"{name} is a corrupt or truncated image: {e}", code="corrupt_file",
                                   source=name) from None
            w, h = img.size
            if w * h > self.config.max_pixels:
                raise ImportFailed(f"{name} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the "
                                   f"{self.config.max_pixels / 1e6:.0f} MP limit (decompression-bomb protection)",
                                   code="too_large", source=name)
            try:
                img.load()
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise ImportFailed(f"{name} is a corrupt or truncated {img.format} image: {e}", code="corrupt_file",
                                   source=name) from None
        meta: dict[str, Any] = {"format": img.format.lower(), "width": w, "height": h, "mode": img.mode,
                                "frames": getattr(img, "n_frames", 1)}
        try:
            from PIL import ExifTags

            exif = img.getexif()
            tags = {ExifTags.TAGS.get(k, str(k)): v for k, v in exif.items()}
            tags.update({ExifTags.TAGS.get(k, str(k)): v for k, v in exif.get_ifd(ExifTags.IFD.Exif).items()})
            kept = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                    for k, v in tags.items() if k in _EXIF_KEEP}
            meta["exif"] = {k: (v if isinstance(v, (int, float)) else str(v).strip("\x00 ")) for k, v in kept.items()}
        except Exception:
            meta["exif"] = {}
        img = ImageOps.exif_transpose(img)
        return img, meta

    def _ocr(self, img, name: str) -> tuple[str, float]:
        """Text in reading order (lines, blank lines between paragraphs) and its mean confidence."""
        import pytesseract
        from PIL import Image

        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        gray = img.convert("L")
        if max(gray.size) < 1000:  # tesseract reads small text better when it is larger
            gray = gray.resize((gray.width * 2, gray.height * 2), Image.Resampling.LANCZOS)
        try:
            with _OCR_LOCK:
                pytesseract.pytesseract.tesseract_cmd = self.config.tesseract_cmd
                data = pytesseract.image_to_data(gray, lang=self.config.ocr_lang, timeout=self.config.ocr_timeout_s,
                                                 output_type=pytesseract.Output.DICT)
        except pytesseract.TesseractNotFoundError:
            raise ImportFailed(self.ocr_status() or "OCR is not available: tesseract was not found",
                               code="ocr_unavailable", source=name) from None
        except pytesseract.TesseractError as e:
            raise ImportFailed(f"OCR failed on {name}: {e.message.strip() if isinstance(e.message, str) else e} "
                               f"(is the tesseract language {self.config.ocr_lang!r} installed?)",
                               code="ocr_unavailable", source=name) from None
        except RuntimeError as e:  # pytesseract's timeout
            raise ImportFailed(f"OCR on {name} took longer than {self.config.ocr_timeout_s:g} s ({e})",
                               code="timeout", source=name) from None
        lines: dict[tuple[int, int, int], list[str]] = {}
        total = weight = 0.0
        for i, word in enumerate(data["text"]):
            conf = float(data["conf"][i])
            if conf < 0 or not word.strip():
                continue
            lines.setdefault((data["block_num"][i], data["par_num"][i], data["line_num"][i]), []).append(word)
            total += conf * len(word)
            weight += len(word)
        paragraphs: dict[tuple[int, int], list[str]] = {}
        for (block, par, _), words in sorted(lines.items()):
            paragraphs.setdefault((block, par), []).append(" ".join(words))
        text = "\n\n".join("\n".join(ls) for _, ls in sorted(paragraphs.items()))
        return re.sub(r"[ \t]+", " ", text).strip(), (total / weight if weight else 0.0)

    def _ocr_examples(self, text: str, name: str) -> list[TrainingExample]:
        chunks = chunk_text(text, max_tokens=self.config.chunk.max_tokens,
                            overlap_tokens=self.config.chunk.overlap_tokens, count_tokens=self.count_tokens)
        out = [TrainingExample.from_text(c.text, source=Source.IMAGE, priority=Priority.LOW, image=name,
                                         extracted="ocr", chunk=c.index) for c in chunks]
        for c in chunks:
            question = (f"What does the image {name} say?" if len(chunks) == 1
                        else f"What does part {c.index + 1} of {len(chunks)} of the image {name} say?")
            out.append(TrainingExample.chat([{"role": "user", "content": question},
                                             {"role": "assistant", "content": c.text}],
                                            source=Source.IMAGE, priority=Priority.LOW, image=name, extracted="ocr",
                                            chunk=c.index))
        return out
