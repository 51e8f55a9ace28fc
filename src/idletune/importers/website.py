"""WebsiteImporter: web pages (and optionally their same-site links) → text chunks on the queue.

Safety defaults, all in :class:`~.config.WebImportConfig`:

- SSRF: every host is resolved before connecting, and the request goes to the address that was
  checked (pinned; the ``Host`` header and TLS SNI keep the name), so DNS rebinding cannot swap in
  another one. Loopback, private, link-local (cloud metadata), CGNAT, multicast, reserved and
  unspecified addresses are refused unless ``allow_private`` or ``allow_hosts`` says otherwise.
  Redirects are followed by hand and each hop is checked the same way. Proxies from the
  environment are not used.
- robots.txt (RFC 9309) is fetched per origin and obeyed; a robots.txt answering 5xx or not
  answering at all means "disallow everything", 4xx means "no rules". ``Crawl-delay`` is honoured
  up to ``max_crawl_delay_s``.
- Limits: body size, time per page and per import, number of redirects, pages and depth.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urljoin, urldefrag, urlsplit, urlunsplit

from ..examples import Priority, Source, TrainingExample
from . import documents
from .chunking import CountTokens, chunk_text
from .config import WebImportConfig
from .results import ImportFailed, ImportResult
from .robots import RobotsTxt

Progress = Callable[[int, int], None]
_SKIP_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".ico", ".css", ".js", ".mjs", ".zip",
                    ".gz", ".tgz", ".tar", ".7z", ".rar", ".mp3", ".mp4", ".avi", ".mov", ".webm", ".woff",
                    ".woff2", ".ttf", ".exe", ".dmg", ".iso", ".apk", ".bin", ".xml", ".rss", ".atom")
_REDIRECTS = (301, 302, 303, 307, 308)
_MENU_TAGS = ("nav", "header", "footer", "aside")


@dataclass
class _Response:
    url: str  # after redirects
    status: int
    content_type: str
    charset: str | None
    body: bytes


class WebsiteImporter:
    """Import a web page, or a small same-site crawl from it.

    Args:
        queue: the :class:`~idletune.queue.TrainingQueue` to add to.
        config: limits and safety settings; keyword ``overrides`` replace single fields, e.g.
            ``WebsiteImporter(queue, allow_hosts=["127.0.0.1"])``.
        count_tokens: token counter for chunking (None: :func:`~.chunking.estimate_tokens`).
        transport: an ``httpx`` transport (tests, custom TLS); None uses the default.
    """

    def __init__(self, queue, config: WebImportConfig | None = None, *, count_tokens: CountTokens | None = None,
                 transport=None, **overrides):
        config = config or WebImportConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.queue = queue
        self.count_tokens = count_tokens
        self._transport = transport
        self._allowed_names = {h.lower().strip("[]") for h in self.config.allow_hosts if "/" not in h}
        self._allowed_nets = [ipaddress.ip_network(h, strict=False) for h in self.config.allow_hosts if "/" in h]

    # ---- public ---------------------------------------------------------------------------------
    def check_url(self, url: str) -> str:
        """Validate a URL (scheme, host, address after DNS) without fetching it; returns it cleaned."""
        url = self._parse(url)
        parts = urlsplit(url)
        self._pin(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), url)
        return url

    def check_crawl(self, depth: int, max_pages: int | None) -> int:
        """Validate crawl bounds against the config; returns ``max_pages`` with its default applied."""
        cfg = self.config
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= cfg.max_depth:
            raise ImportFailed(f"depth must be an integer from 0 to {cfg.max_depth}, got {depth!r}",
                               code="invalid_request", param="depth")
        max_pages = cfg.max_pages if max_pages is None else max_pages
        if not isinstance(max_pages, int) or isinstance(max_pages, bool) or not 1 <= max_pages <= cfg.max_pages_limit:
            raise ImportFailed(f"max_pages must be an integer from 1 to {cfg.max_pages_limit}, got {max_pages!r}",
                               code="invalid_request", param="max_pages")
        return max_pages

    def import_website(self, url: str, depth: int = 0, max_pages: int | None = None, *,
                       progress: Progress | None = None) -> ImportResult:
        """Fetch ``url``, extract its main text and queue it in chunks; with ``depth`` > 0 also
        follow same-site links breadth-first, up to ``max_pages`` pages in all.

        Raises:
            ImportFailed: the start page cannot be imported (invalid or refused URL, robots.txt,
                unreachable, HTTP error, not a page, no text). Later pages that fail are skipped
                and listed in the result instead.
        """
        cfg = self.config
        max_pages = self.check_crawl(depth, max_pages)
        start = self._parse(url)
        result = ImportResult(source=start, importer="website",
                              metadata={"url": start, "format": None, "title": None, "pages": []})
        deadline = time.monotonic() + cfg.total_time_s
        robots: dict[str, RobotsTxt] = {}
        examples: list[TrainingExample] = []
        todo = deque([(start, 0)])
        seen = {_norm(start)}
        site: tuple[str, int] | None = None
        fetched = 0
        import httpx

        with httpx.Client(timeout=httpx.Timeout(cfg.timeout_s), follow_redirects=False, trust_env=False,
                          transport=self._transport, headers={"User-Agent": cfg.user_agent}) as client:
            while todo and fetched < max_pages:
                page_url, page_depth = todo.popleft()
                first = site is None
                if time.monotonic() > deadline:
                    result.skip(f"{len(todo) + 1} page(s)", f"the import's time limit of {cfg.total_time_s:g} s ran out")
                    break
                try:
                    rules = self._robots(client, page_url, robots)
                    if not rules.allowed(cfg.user_agent, page_url):
                        raise ImportFailed(f"robots.txt of {_origin(page_url)} disallows {page_url} for "
                                           f"{cfg.user_agent.split('/')[0]}", code="robots_disallowed", source=page_url)
                    delay = min(rules.crawl_delay(cfg.user_agent), cfg.max_crawl_delay_s)
                    if delay and not first:
                        time.sleep(delay)
                    fetched += 1
                    resp = self._fetch(client, page_url, cfg.max_page_bytes, min(deadline, time.monotonic() + cfg.page_time_s))
                    if _origin(resp.url) != _origin(page_url) and \
                            not self._robots(client, resp.url, robots).allowed(cfg.user_agent, resp.url):
                        raise ImportFailed(f"{page_url} redirects to {resp.url}, which robots.txt of "
                                           f"{_origin(resp.url)} disallows", code="robots_disallowed", source=page_url)
                    if resp.status >= 400:
                        raise ImportFailed(f"{page_url} answered HTTP {resp.status}", code=f"http_{resp.status}",
                                           source=page_url)
                    fmt, text, title, links = self._extract(resp, page_url)
                except ImportFailed as e:
                    if first:
                        raise
                    result.skip(page_url, e.message)
                    continue
                if first:
                    final = urlsplit(resp.url)
                    site = _site(final)
                    result.metadata.update(final_url=resp.url, format=fmt, title=title)
                    seen.add(_norm(resp.url))
                page_examples = self._examples(text, resp.url, title, page_depth)
                examples += page_examples
                result.metadata["pages"].append({"url": resp.url, "title": title, "chunks": len(page_examples)})
                if page_depth < depth:
                    for link in links:
                        try:
                            link = self._parse(link)
                        except ImportFailed:
                            continue
                        key = _norm(link)
                        if key not in seen and _site(urlsplit(link)) == site:
                            seen.add(key)
                            todo.append((link, page_depth + 1))
                if progress:
                    progress(fetched, min(max_pages, fetched + len(todo)))
        if todo and fetched >= max_pages:
            result.warnings.append(f"stopped at max_pages={max_pages}; {len(todo)} more same-site link(s) not fetched")
        result.metadata["pages_imported"] = len(result.metadata["pages"])
        result.record(examples, self.queue.add_many(examples))
        return result

    # ---- fetching -------------------------------------------------------------------------------
    def _parse(self, url: str) -> str:
        if not isinstance(url, str) or not url.strip():
            raise ImportFailed("url must be a non-empty string", code="invalid_url", param="url")
        url = url.strip()
        if len(url) > 2048:
            raise ImportFailed("url is longer than 2048 characters", code="invalid_url", param="url")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ImportFailed(f"{url!r} is not a valid URL ({e})", code="invalid_url", param="url") from None
        if parts.scheme.lower() not in ("http", "https"):
            hint = " (add https:// in front)" if not parts.scheme and "." in url.split("/")[0] else ""
            raise ImportFailed(f"only http:// and https:// URLs can be imported, got {url!r}{hint}",
                               code="invalid_url", param="url")
        if not parts.hostname:
            raise ImportFailed(f"{url!r} has no host name", code="invalid_url", param="url")
        if parts.username or parts.password:
            raise ImportFailed("URLs with a user name or password are not imported", code="invalid_url", param="url")
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if port:
            netloc += f":{port}"
        return urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))

    def _pin(self, host: str, port: int, url: str) -> str:
        """Resolve ``host`` and return an address we may connect to, or refuse (SSRF)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise ImportFailed(f"cannot resolve host {host!r} ({e})", code="unreachable", source=url) from None
        refused = None
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            why = self._refusal(host, addr)
            if why is None:
                return str(addr)
            refused = refused or (addr, why)
        addr, why = refused
        raise ImportFailed(f"refusing to fetch {url}: {host} resolves to {addr}, {why}. To import from it on "
                           f"purpose, allow it: a server with server.import_allow_hosts = [\"{host}\"] in its config "
                           f"(or --set 'server.import_allow_hosts=[\"{host}\"]'); `idletune import --allow-private`; "
                           f"in Python WebsiteImporter(..., allow_hosts=[{host!r}])",
                           code="blocked_address", source=url, param="url")

    def _refusal(self, host: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        if self.config.allow_private or host.lower() in self._allowed_names or str(addr) in self._allowed_names:
            return None
        if any(addr in net for net in self._allowed_nets):
            return None
        real = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped else addr
        for test, what in ((real.is_loopback, "a loopback address"), (real.is_link_local, "a link-local address "
                           "(this includes cloud metadata services)"), (real.is_private, "a private address"),
                           (real.is_multicast, "a multicast address"), (real.is_unspecified, "an unspecified address"),
                           (real.is_reserved, "a reserved address"), (not real.is_global, "not a public address")):
            if test:
                return what
        return None

    def _fetch(self, client, url: str, max_bytes: int, deadline: float) -> _Response:
        import httpx

        for _hop in range(self.config.max_redirects + 1):
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            ip = self._pin(parts.hostname, port, url)
            ip_host = f"[{ip}]" if ":" in ip else ip
            target = urlunsplit((parts.scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
            host_header = parts.netloc.rsplit("@", 1)[-1]
            ext = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImportFailed(f"{url} took longer than the time limit", code="timeout", source=url)
            try:
                with client.stream("GET", target, headers={"Host": host_header, "Accept":
                                   "text/html,application/xhtml+xml,text/plain;q=0.9,application/pdf;q=0.8,*/*;q=0.1"},
                                   extensions=ext, timeout=httpx.Timeout(min(self.config.timeout_s, remaining))) as r:
                    if r.status_code in _REDIRECTS and r.headers.get("location"):
                        url = self._parse(urljoin(url, r.headers["location"]))
                        continue
                    length = r.headers.get("content-length")
                    if length and length.isdigit() and int(length) > max_bytes:
                        raise ImportFailed(f"{url} is {int(length) / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB "
                                           "page limit", code="too_large", source=url)
                    body = bytearray()
                    for chunk in r.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise ImportFailed(f"{url} is larger than the {max_bytes / 1e6:.1f} MB page limit",
                                               code="too_large", source=url)
                        if time.monotonic() > deadline:
                            raise ImportFailed(f"{url} took longer than the time limit", code="timeout", source=url)
                    ctype = r.headers.get("content-type", "")
                    return _Response(url, r.status_code, ctype.split(";")[0].strip().lower(), r.charset_encoding,
                                     bytes(body))
            except httpx.TimeoutException:
                raise ImportFailed(f"{url} did not answer in time", code="timeout", source=url) from None
            except httpx.HTTPError as e:
                raise ImportFailed(f"cannot fetch {url}: {type(e).__name__}: {e}", code="unreachable",
                                   source=url) from None
        raise ImportFailed(f"{url}: more than {self.config.max_redirects} redirects", code="too_many_redirects",
                           source=url)

    def _robots(self, client, url: str, cache: dict[str, RobotsTxt]) -> RobotsTxt:
        origin = _origin(url)
        if origin not in cache:
            try:
                resp = self._fetch(client, origin + "/robots.txt", 512 * 1024,
                                   time.monotonic() + self.config.page_time_s)
            except ImportFailed as e:
                if e.code == "blocked_address":
                    raise
                cache[origin] = RobotsTxt(disallow_all=True)
                if e.code in ("unreachable", "timeout"):  # the site itself, not its rules
                    what = "did not answer in time" if e.code == "timeout" else "cannot be reached"
                    raise ImportFailed(f"{origin} {what} ({e.message})", code=e.code, source=url) from None
                raise ImportFailed(f"robots.txt of {origin} could not be read ({e.message}); not fetching pages "
                                   "of a site whose rules are unknown", code="robots_unavailable", source=url) from None
            if resp.status >= 500:
                cache[origin] = RobotsTxt(disallow_all=True)
            elif resp.status >= 400:
                cache[origin] = RobotsTxt(allow_all=True)
            else:
                cache[origin] = RobotsTxt.parse(resp.body.decode(resp.charset or "utf-8", "replace"))
        rules = cache[origin]
        if rules.disallow_all:
            raise ImportFailed(f"robots.txt of {origin} answered with a server error; treating the site as "
                               "disallowed (RFC 9309)", code="robots_disallowed", source=url)
        return rules

    # ---- content --------------------------------------------------------------------------------
    def _extract(self, resp: _Response, url: str) -> tuple[str, str, str | None, list[str]]:
        ctype = resp.content_type or ("text/html" if resp.body.lstrip()[:1] == b"<" else "")
        if not resp.body.strip():
            raise ImportFailed(f"{url} is an empty page", code="empty", source=url)
        if ctype in ("text/html", "application/xhtml+xml"):
            html = resp.body.decode(resp.charset, "replace") if resp.charset else resp.body
            text = documents.html_to_text(html, resp.url)
            if not text.strip():
                raise ImportFailed(f"{url} has no main text (an empty page, or only navigation and scripts)",
                                   code="no_content", source=url)
            return "html", text, documents.html_title(html), _links(html, resp.url)
        if ctype in ("text/plain", "text/markdown", "text/x-markdown"):
            decoded = resp.body.decode(resp.charset or "utf-8", "replace")
            text, title = documents.clean_markdown(decoded) if ctype != "text/plain" else (documents.clean_plain(decoded), None)
            if not text:
                raise ImportFailed(f"{url} is an empty page", code="empty", source=url)
            return ctype.split("/")[1], text, title, []
        if ctype == "application/pdf" or resp.body.startswith(b"%PDF-"):
            pages = documents.pdf_pages(resp.body, url, max_pages=2000)
            text = "\n\n".join(p for p in pages.pages if p)
            if not text:
                raise ImportFailed(f"{url} is a PDF without a text layer", code="no_content", source=url)
            return "pdf", text, pages.title, []
        raise ImportFailed(f"{url} is not a web page (content type {ctype or 'unknown'}); only HTML, plain text, "
                           "Markdown and PDF are imported from URLs", code="not_html", source=url)

    def _examples(self, text: str, url: str, title: str | None, depth: int) -> list[TrainingExample]:
        chunk = self.config.chunk
        meta = {"url": url, **({"title": title} if title else {})}
        return [TrainingExample.from_text(c.text, source=Source.WEB, priority=Priority.LOW, **meta, chunk=c.index,
                                          depth=depth, **({"section": c.section} if c.section else {}))
                for c in chunk_text(text, max_tokens=chunk.max_tokens, overlap_tokens=chunk.overlap_tokens,
                                    count_tokens=self.count_tokens)]


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def _site(parts) -> tuple[str, int]:
    host = (parts.hostname or "").lower()
    host = host[4:] if host.startswith("www.") else host
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def _norm(url: str) -> str:
    p = urlsplit(urldefrag(url)[0])
    return urlunsplit((p.scheme.lower(), p.netloc.lower(), p.path or "/", p.query, ""))


def _links(html: str | bytes, base: str) -> list[str]:
    """Absolute http(s) links of a page without fragments and non-page files: links in the main
    content first, then those in navigation, headers, footers and sidebars (so a crawl's
    ``max_pages`` is spent on what the page links to, not on its menu)."""
    import lxml.html
    from lxml import etree

    try:
        doc = lxml.html.fromstring(html)
    except (etree.ParserError, ValueError):
        return []
    base_el = doc.find(".//base[@href]")
    base = urljoin(base, base_el.get("href")) if base_el is not None else base
    content, boilerplate = [], []
    for a in doc.iter("a"):
        href = (a.get("href") or "").strip()
        if not href or "nofollow" in (a.get("rel") or "").lower():
            continue
        link = urldefrag(urljoin(base, href))[0]
        p = urlsplit(link)
        if p.scheme not in ("http", "https") or p.path.lower().endswith(_SKIP_EXTENSIONS):
            continue
        in_menu = any(el.tag in _MENU_TAGS or (el.get("role") or "") == "navigation" for el in a.iterancestors())
        (boilerplate if in_menu else content).append(link)
    return content + boilerplate
