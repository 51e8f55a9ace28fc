"""WebsiteImporter against a real HTTP server on 127.0.0.1 serving fixture pages."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from idletune.examples import Source
from idletune.importers import ImportFailed, WebsiteImporter
from idletune.importers.robots import RobotsTxt
from idletune.queue import TrainingQueue

NAV = "".join(f'<li><a href="/nav{i}">Navigation item {i}</a></li>' for i in range(60))
SIDEBAR = "".join(f'<li><a href="/tag/{i}">Popular tag number {i}</a></li>' for i in range(30))


def page(title: str, body: str, links: str = "") -> bytes:
    return f"""<!doctype html><html><head><title>{title} | Zorblax Wiki</title>
<script>var tracking = "SCRIPT_SHOULD_NOT_APPEAR";</script><style>.x{{color:red}}</style></head>
<body><header><div class="logo">Zorblax Wiki</div><nav><ul>{NAV}</ul></nav></header>
<aside class="sidebar"><h3>Popular tags</h3><ul>{SIDEBAR}</ul></aside>
<main><article><h1>{title}</h1>{body}<p>{links}</p></article></main>
<footer><p>Copyright 2024 Zorblax Wiki. FOOTER_SHOULD_NOT_APPEAR. Privacy | Terms | Contact</p></footer>
</body></html>""".encode()


FACTS = ("<p>The Zorblax is a small blue creature that lives in the mountains of Quellia. It eats moss, "
         "sings at dawn and can hold its breath for eleven minutes.</p>"
         "<h2>Behaviour</h2><p>Zorblaxes gather in groups of seven during the winter solstice and hum in "
         "harmony for hours. Scientists believe the humming keeps the group warm.</p>")

PAGES = {
    "/": (200, "text/html; charset=utf-8", page("Facts about the Zorblax", FACTS,
          '<a href="/habitat">Habitat</a> <a href="/diet#top">Diet</a> <a href="/private/secret">Secret</a> '
          '<a href="/missing">Missing</a> <a href="http://example.invalid/elsewhere">Elsewhere</a> '
          '<a href="/photo.png">Photo</a> <a href="/redirect-to-metadata">Cloud</a>')),
    "/habitat": (200, "text/html", page("Zorblax habitat", "<p>Zorblaxes prefer cold rocky slopes above two "
                 "thousand metres, where few predators reach them. They build nests from lichen and feathers "
                 "and line them with soft grey moss gathered at night.</p>", '<a href="/deep">Deeper</a>')),
    "/diet": (200, "text/html", page("Zorblax diet", "<p>A Zorblax eats about three hundred grams of moss a day "
              "and, in autumn, the red berries of the quellberry bush, which turn its fur slightly purple.</p>")),
    "/deep": (200, "text/html", page("Deep page", "<p>This page is two links away from the start page and "
              "explains that Zorblax eggs hatch after exactly forty days in the nest.</p>")),
    "/private/secret": (200, "text/html", page("Secret", "<p>PRIVATE_TEXT_SHOULD_NOT_BE_FETCHED lorem ipsum dolor "
                        "sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.</p>")),
    "/robots.txt": (200, "text/plain", b"User-agent: *\nDisallow: /private/\nAllow: /private/open\n"),
    "/empty": (200, "text/html", b"<html><head><title>Nothing</title></head><body><nav><a href='/'>Home</a>"
               b"</nav></body></html>"),
    "/data.bin": (200, "application/octet-stream", b"\x00\x01\x02binary stuff"),
    "/notes.txt": (200, "text/plain; charset=utf-8", "Plain text notes: the quellberry is sour. \u2713".encode()),
    "/big": (200, "text/html", b"<html><body><p>" + b"big " * 50_000 + b"</p></body></html>"),
}
REDIRECTS = {"/redirect": "/habitat", "/loop": "/loop", "/redirect-to-metadata": "http://169.254.169.254/latest/meta-data/"}


class Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        Handler.hits.append(self.path)
        if self.path in REDIRECTS:
            self.send_response(302)
            self.send_header("Location", REDIRECTS[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/slow":
            time.sleep(1.5)
        status, ctype, body = PAGES.get(self.path, (404, "text/html", b"<h1>Not found</h1>"))
        if self.path == "/slow":
            status, ctype, body = PAGES["/diet"]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the importer hung up on purpose (size or time limit)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def queue(tmp_path):
    q = TrainingQueue(tmp_path / "queue.db")
    yield q
    q.close()


def importer(queue, **kw) -> WebsiteImporter:
    return WebsiteImporter(queue, allow_hosts=["127.0.0.1"], **kw)


def test_single_page_main_text_without_navigation(server, queue):
    result = importer(queue).import_website(server + "/")
    assert result.examples_added >= 1 and result.examples_generated == result.examples_added
    assert result.metadata["title"] and "Zorblax" in result.metadata["title"]
    assert result.metadata["format"] == "html" and result.metadata["pages_imported"] == 1
    texts = [e.text for e in queue.recent(50)]
    joined = "\n".join(texts)
    assert "eleven minutes" in joined and "humming keeps the group warm" in joined
    for junk in ("Navigation item", "Popular tag", "SCRIPT_SHOULD_NOT_APPEAR", "FOOTER_SHOULD_NOT_APPEAR"):
        assert junk not in joined
    ex = queue.recent(1)[0]
    assert ex.source == Source.WEB and ex.metadata["url"] == server + "/" and ex.metadata["title"]


def test_reimport_adds_nothing(server, queue):
    first = importer(queue).import_website(server + "/habitat")
    again = importer(queue).import_website(server + "/habitat")
    assert first.examples_added > 0
    assert again.examples_added == 0 and again.duplicates == first.examples_generated
    assert queue.size() == first.examples_added


def test_crawl_respects_depth_robots_and_same_site(server, queue):
    Handler.hits.clear()
    progress = []
    result = importer(queue).import_website(server + "/", depth=1, max_pages=10,
                                            progress=lambda d, t: progress.append((d, t)))
    urls = [p["url"] for p in result.metadata["pages"]]
    assert server + "/habitat" in urls and server + "/diet" in urls
    assert server + "/deep" not in urls  # depth 2
    assert "/private/secret" not in Handler.hits  # robots.txt: never even requested
    assert "/photo.png" not in Handler.hits and "/deep" not in Handler.hits
    skipped = dict(result.skipped)
    assert "robots.txt" in skipped[server + "/private/secret"]
    assert "404" in skipped[server + "/missing"]
    assert "169.254.169.254" in skipped[server + "/redirect-to-metadata"]  # SSRF checked on redirects
    assert not any("example.invalid" in u for u in urls + list(skipped))  # other sites are not crawled
    assert "PRIVATE_TEXT" not in "\n".join(e.text for e in queue.recent(100))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress) and progress[-1][0] >= 3
    assert all(d <= t <= 10 for d, t in progress)


def test_max_pages_limits_crawl(server, queue):
    result = importer(queue).import_website(server + "/", depth=2, max_pages=2)
    assert result.metadata["pages_imported"] <= 2
    assert any("max_pages=2" in w for w in result.warnings)


def test_redirect_is_followed(server, queue):
    result = importer(queue).import_website(server + "/redirect")
    assert result.metadata["final_url"] == server + "/habitat"
    assert "lichen" in queue.recent(1)[0].text


@pytest.mark.parametrize("path, code, words", [
    ("/missing", "http_404", "HTTP 404"),
    ("/private/secret", "robots_disallowed", "robots.txt"),
    ("/empty", "no_content", "no main text"),
    ("/data.bin", "not_html", "application/octet-stream"),
    ("/loop", "too_many_redirects", "redirects"),
    ("/redirect-to-metadata", "blocked_address", "169.254.169.254"),
])
def test_start_page_failures_are_clear_and_add_nothing(server, queue, path, code, words):
    with pytest.raises(ImportFailed) as e:
        importer(queue).import_website(server + path)
    assert e.value.code == code and words in str(e.value)
    assert queue.size() == 0


def test_plain_text_url(server, queue):
    result = importer(queue).import_website(server + "/notes.txt")
    assert result.metadata["format"] == "plain"
    assert "quellberry is sour" in queue.recent(1)[0].text


def test_size_and_time_limits(server, queue):
    with pytest.raises(ImportFailed) as e:
        importer(queue, max_page_bytes=50_000).import_website(server + "/big")
    assert e.value.code == "too_large" and e.value.http_status == 413
    with pytest.raises(ImportFailed) as e:
        importer(queue, timeout_s=0.3).import_website(server + "/slow")
    assert e.value.code == "timeout"


def test_unreachable_host(queue):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ImportFailed) as e:
        importer(queue).import_website(f"http://127.0.0.1:{port}/")
    # the site cannot be reached (its robots.txt, fetched first, is not to blame)
    assert e.value.code == "unreachable" and "127.0.0.1" in str(e.value) and "cannot be reached" in str(e.value)
    assert "robots.txt of" not in str(e.value) and "rules are unknown" not in str(e.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1/", "http://localhost:8000/x", "http://[::1]/", "http://10.1.2.3/",
                                 "http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/",
                                 "http://0.0.0.0/", "http://100.64.0.1/", "http://192.168.1.1:8080/"])
def test_ssrf_refused_by_default(queue, url):
    with pytest.raises(ImportFailed) as e:
        WebsiteImporter(queue).import_website(url)
    assert e.value.code == "blocked_address" and "allow_hosts" in str(e.value)
    assert "server.import_allow_hosts" in str(e.value)  # what a server's user sets (over HTTP)


def test_allow_list_options(queue):
    assert WebsiteImporter(queue, allow_private=True).check_url("http://10.1.2.3/a") == "http://10.1.2.3/a"
    assert WebsiteImporter(queue, allow_hosts=["10.0.0.0/8"]).check_url("http://10.1.2.3/")
    assert WebsiteImporter(queue, allow_hosts=["localhost"]).check_url("http://localhost:9/")
    with pytest.raises(ImportFailed):
        WebsiteImporter(queue, allow_hosts=["10.0.0.0/8"]).check_url("http://192.168.0.1/")


@pytest.mark.parametrize("url, words", [("ftp://example.com/x", "http"), ("example.com/page", "https://"),
                                        ("http://user:pw@example.com/", "password"), ("", "non-empty"),
                                        ("http:///path", "host")])
def test_invalid_urls(queue, url, words):
    with pytest.raises(ImportFailed) as e:
        WebsiteImporter(queue).import_website(url)
    assert words in str(e.value) and e.value.param == "url"


def test_crawl_bounds_validated(queue):
    with pytest.raises(ImportFailed, match="depth"):
        WebsiteImporter(queue).import_website("https://example.com/", depth=99)
    with pytest.raises(ImportFailed, match="max_pages"):
        WebsiteImporter(queue).import_website("https://example.com/", max_pages=0)
    with pytest.raises(ValueError, match="allow_hosts"):
        WebsiteImporter(queue, allow_hosts="127.0.0.1")


def test_robots_rules_longest_match_and_wildcards():
    r = RobotsTxt.parse("""
User-agent: *
Disallow: /private/
Allow: /private/open
Disallow: /*?session=
Disallow: /*.pdf$

User-agent: idletune
Disallow: /no-idletune
Crawl-delay: 2
""")
    ua = "idletune/0.1 (test)"
    assert r.allowed("other", "http://x/private/open/page") and not r.allowed("other", "http://x/private/a")
    assert not r.allowed("other", "http://x/a?session=1") and r.allowed("other", "http://x/a?page=1")
    assert not r.allowed("other", "http://x/doc.pdf") and r.allowed("other", "http://x/doc.pdf.html")
    # Our own group replaces the * group.
    assert r.allowed(ua, "http://x/private/a") and not r.allowed(ua, "http://x/no-idletune")
    assert r.crawl_delay(ua) == 2.0 and r.crawl_delay("other") == 0.0
    assert RobotsTxt.parse("User-agent: *\nDisallow:\n").allowed(ua, "http://x/anything")
