"""A small English corpus that needs no download: documentation shipped with CPython.

Two sources, both present in every standard CPython install, so pretraining smoke runs and
tests work offline:
  * `pydoc_data.topics.topics`: the language reference topics behind `help()`.
  * docstrings of a fixed list of well-documented standard-library modules, found by a
    lexical scan of their source (never imported, so no side effects). The topics alone are
    ~0.35 MB, which a tiny BERT would see ten times over in a few hundred steps; the
    docstrings add ~0.8 MB.

Documents are prose paragraphs; code samples, grammar rules, tables and doctests are
dropped. The result is deterministic for a given Python version (the text itself differs a
little between Python releases).
"""
from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import sysconfig

MIN_WORDS = 8

# Chosen for docstring volume; names that a Python release lacks are skipped.
_DOCSTRING_MODULES = (
    "_pydecimal", "turtle", "doctest", "typing", "logging", "difflib", "inspect", "_pyio",
    "unittest.mock", "logging.handlers", "threading", "xml.etree.ElementTree", "ipaddress",
    "email.message", "smtplib", "pdb", "codecs", "unittest.case", "tarfile", "configparser",
    "statistics", "http.cookiejar", "os", "shutil", "http.server", "urllib.request",
    "optparse", "subprocess", "traceback", "urllib.parse", "ssl", "argparse", "socket",
    "pydoc", "bdb", "xmlrpc.server", "xml.sax.handler", "re", "ast", "email._policybase",
    "socketserver", "asyncio.events", "pathlib", "zipfile", "asyncio.base_events",
    "http.client", "ftplib", "platform", "asyncio.tasks", "enum", "concurrent.futures._base",
    "json", "pkgutil", "tempfile", "asyncio.locks", "datetime", "mailbox", "collections",
    "mimetypes", "fileinput", "textwrap", "random", "functools", "uuid", "timeit", "cmd",
    "pickle", "queue", "base64", "fractions", "gzip", "locale", "code", "shelve", "tokenize",
    "email._header_value_parser", "importlib._bootstrap_external", "imaplib",
    "importlib.metadata", "wave", "importlib._bootstrap", "email.charset", "xml.sax.xmlreader",
    "email.headerregistry", "email.header", "_collections_abc", "email.policy", "lzma",
    "asyncio.streams", "site", "xmlrpc.client", "importlib.abc", "bz2", "asyncio.transports",
    "wsgiref.handlers", "asyncio.unix_events", "asyncio.protocols",
    "concurrent.futures.process", "dis", "venv", "contextlib", "calendar", "asyncio.sslproto",
    "email.generator", "email.quoprimime", "graphlib", "logging.config", "email.utils",
    "py_compile", "multiprocessing.managers", "json.encoder", "zipimport", "json.decoder",
    "pyclbr", "selectors", "http.cookies", "pstats", "profile", "wsgiref.validate", "weakref",
    "dataclasses", "asyncio.futures", "sched", "email.parser", "warnings", "pickletools",
    "heapq", "importlib.util", "compileall", "getopt", "unittest.loader", "asyncio.queues",
    "poplib", "trace", "numbers", "filecmp", "hmac", "copy", "runpy", "symtable", "webbrowser",
    "abc", "operator", "pprint", "csv", "plistlib", "io", "types", "bisect",
)

_RULE_LINE = re.compile(r"\s*[*=\-~^#+]+\s*")     # RST heading underlines
_PLAIN_WORD = re.compile(r"[A-Za-z][a-z'’]*[,.;:!?]?")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _prose(paragraph: str) -> str | None:
  """The paragraph as one line of text, or None if it is code, a table or too short."""
  lines = paragraph.splitlines()
  for line in lines:
    stripped = line.strip()
    # Tables, doctests and grammar productions are not natural language.
    if stripped.startswith(("+-", "+=", "|", ">>>")) or "::=" in stripped:
      return None
  text = " ".join(l.strip() for l in lines if l.strip() and not _RULE_LINE.fullmatch(l))
  words = text.split()
  if len(words) < MIN_WORDS:
    return None
  # Signatures and code listings are mostly identifiers with dots, underscores and brackets.
  plain = sum(1 for w in words if _PLAIN_WORD.fullmatch(w))
  if plain < 0.6 * len(words):
    return None
  return text


def _paragraphs(text: str) -> list[str]:
  out = []
  for para in _PARAGRAPH_BREAK.split(text):
    prose = _prose(para)
    if prose is not None:
      out.append(prose)
  return out


def _module_path(stdlib: str, dotted: str) -> str | None:
  base = os.path.join(stdlib, *dotted.split("."))
  for candidate in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.isfile(candidate):
      return candidate
  return None


# Comments and string literals in source order. Matching them in one pass means a quote
# inside a comment or another string can never be mistaken for the start of a docstring.
_TRIPLE = "(?P<quote>\"\"\"|''')"
_LEXEME = re.compile(
    r"\#[^\n]*"
    r"|(?P<prefix>[rRuUbBfF]{0,2})(?:" + _TRIPLE + r"(?:\\.|[^\\])*?(?P=quote)"
    r"|\"(?:\\.|[^\"\\\n])*\""
    r"|'(?:\\.|[^'\\\n])*')",
    re.DOTALL)
_COMMENT = re.compile(r"#[^\n]*")
# A docstring follows the ':' that ends a def/class header, on a later line.
_AFTER_HEADER = re.compile(r":[ \t]*\n\s*\Z")


def _docstrings(path: str) -> list[str]:
  """Docstrings of a module, its classes and functions, in source order.

  A lexical scan rather than `ast.parse`, which costs seconds for ~150 modules: a string
  literal counts when it opens the module or directly follows a block header's ':'.
  """
  try:
    with open(path, encoding="utf-8") as f:
      source = f.read()
  except (OSError, UnicodeDecodeError):
    return []
  docs = []
  code_end = 0
  for m in _LEXEME.finditer(source):
    if m.group(0).startswith("#"):
      continue
    gap = _COMMENT.sub("", source[code_end:m.start()])
    at_module_start = code_end == 0 and not gap.strip()
    code_end = m.end()
    if set(m.group("prefix").lower()) & {"b", "f"}:
      continue
    if not (at_module_start or _AFTER_HEADER.search(gap)):
      continue
    try:
      value = ast.literal_eval(m.group(0))
    except (SyntaxError, ValueError):
      continue
    docs.append(inspect.cleandoc(value))
  return docs


def topic_documents() -> list[str]:
  """Prose paragraphs of the Python language reference topics (pydoc_data)."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  out = []
  for key in sorted(topics):
    out.extend(_paragraphs(topics[key]))
  return out


def docstring_documents() -> list[str]:
  """Prose paragraphs of docstrings of `_DOCSTRING_MODULES` in the running Python's stdlib."""
  stdlib = sysconfig.get_paths()["stdlib"]
  out = []
  for name in _DOCSTRING_MODULES:
    path = _module_path(stdlib, name)
    if path is None:
      continue
    for doc in _docstrings(path):
      out.extend(_paragraphs(doc))
  return out


@functools.lru_cache(maxsize=1)
def _embedded() -> tuple[str, ...]:
  seen = set()
  out = []
  # Exact repeats ("Changed in version ...") would only add repetition.
  for doc in topic_documents() + docstring_documents():
    if doc not in seen:
      seen.add(doc)
      out.append(doc)
  return tuple(out)


def embedded_documents() -> list[str]:
  """Paragraph-sized English documents from CPython's own documentation; deterministic order."""
  return list(_embedded())
