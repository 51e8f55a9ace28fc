"""robots.txt as RFC 9309 reads it: groups per user agent, longest match wins, ``*`` and ``$``.

(The standard library's ``urllib.robotparser`` applies rules in file order and ignores
wildcards, so ``Disallow: /*?session=`` or ``Allow: /docs`` after ``Disallow: /`` would be
misread.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit


@dataclass
class _Rule:
    allow: bool
    path: str
    regex: re.Pattern

    @classmethod
    def make(cls, allow: bool, path: str) -> "_Rule":
        path = _normalize(path)
        anchored = path.endswith("$")
        body = path[:-1] if anchored else path
        pattern = ".*".join(re.escape(p) for p in body.split("*"))
        return cls(allow, path, re.compile(pattern + ("$" if anchored else "")))


@dataclass
class RobotsTxt:
    """Parsed rules; :meth:`allowed` answers for one user agent and URL."""

    groups: list[tuple[list[str], list[_Rule]]] = field(default_factory=list)
    crawl_delays: dict[str, float] = field(default_factory=dict)
    allow_all: bool = False
    disallow_all: bool = False

    @classmethod
    def parse(cls, text: str) -> "RobotsTxt":
        robots = cls()
        agents: list[str] = []
        rules: list[_Rule] = []
        in_rules = False
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if ":" not in line:
                continue
            key, value = (s.strip() for s in line.split(":", 1))
            key = key.lower()
            if key == "user-agent":
                if in_rules:  # a new group starts
                    robots.groups.append((agents, rules))
                    agents, rules, in_rules = [], [], False
                agents.append(value.lower())
            elif key in ("allow", "disallow") and agents:
                in_rules = True
                if value:  # "Disallow:" with no path allows everything
                    rules.append(_Rule.make(key == "allow", value))
            elif key == "crawl-delay" and agents:
                in_rules = True
                try:
                    for a in agents:
                        robots.crawl_delays[a] = float(value)
                except ValueError:
                    pass
        if agents:
            robots.groups.append((agents, rules))
        return robots

    def _group(self, user_agent: str) -> tuple[str | None, list[_Rule]]:
        token = user_agent.split("/", 1)[0].strip().lower()
        matched: list[_Rule] = []
        name = None
        for agents, rules in self.groups:  # groups naming the same agent are merged (RFC 9309 2.2.1)
            if token in agents:
                matched += rules
                name = token
        if name is not None:
            return name, matched
        for agents, rules in self.groups:
            if "*" in agents:
                matched += rules
                name = "*"
        return name, matched

    def allowed(self, user_agent: str, url: str) -> bool:
        if self.disallow_all:
            return False
        if self.allow_all:
            return True
        parts = urlsplit(url)
        path = _normalize((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        if path == "/robots.txt":
            return True
        _, rules = self._group(user_agent)
        best: _Rule | None = None
        for rule in rules:
            if rule.regex.match(path):
                if best is None or len(rule.path) > len(best.path) or (len(rule.path) == len(best.path) and rule.allow):
                    best = rule
        return best is None or best.allow

    def crawl_delay(self, user_agent: str) -> float:
        name, _ = self._group(user_agent)
        return self.crawl_delays.get(name or "*", 0.0)


def _normalize(path: str) -> str:
    """Percent-encode consistently so ``/a b`` and ``/a%20b`` compare equal."""
    return quote(unquote(path), safe="/?=&*$%:@!,;+~-._")
