"""What clients send, cut into what a model translates, and put back together.

nmt translates one segment at a time and truncates an over-long one, but clients send
paragraphs, several lines and HTML. ``Document`` cuts a text into the pieces to translate
and keeps everything between them as it was:

* plain text is cut at line breaks, then into sentences by ``sentencex`` (a rule-based
  splitter with abbreviation lists for some 300 languages, chosen by the source language);
  the whitespace around each sentence (spaces, blank lines, the line breaks) is kept;
* HTML (``format=html``) is parsed, and each text node is translated on its own, its markup
  written back unchanged. Text inside ``script``, ``style`` and any element marked
  ``translate="no"`` is left alone, as is a text node without a letter (a "@" or "·").
  Inline markup therefore cuts a sentence into separately translated parts: "a <b>big</b>
  dog" is three segments.

``Document.rebuild`` puts the translations of its segments back where they came from.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from sentencex import segment

LINE_BREAK = re.compile(r"(\r\n|\r|\n)")
OUTER_SPACE = re.compile(r"^(\s*)(.*?)(\s*)$", re.S)
SKIPPED_ELEMENTS = {"script", "style"}
VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
                 "track", "wbr"}


@dataclass
class Document:
    """A text as a list of parts, each either kept as it is or translated (``segments`` holds
    their indices in ``parts``)."""

    parts: list[str]
    segments: list[int]
    escape: bool = False  # HTML: translations are written back escaped

    @property
    def sources(self) -> list[str]:
        return [self.parts[i] for i in self.segments]

    def rebuild(self, translations: list[str]) -> str:
        """The text with each segment replaced by its translation, in order."""
        parts = list(self.parts)
        for i, text in zip(self.segments, translations, strict=True):
            parts[i] = html.escape(text, quote=False) if self.escape else text
        return "".join(parts)


def _add_sentences(parts: list[str], segments: list[int], text: str, language: str) -> None:
    """Append ``text`` cut at line breaks and sentence ends, whitespace kept as parts of its own."""
    for line in LINE_BREAK.split(text):
        if not line or LINE_BREAK.fullmatch(line):
            parts.append(line)
            continue
        for sentence in segment(language, line):
            lead, core, trail = OUTER_SPACE.match(sentence).groups()
            parts.append(lead)
            if core:
                segments.append(len(parts))
                parts.append(core)
            parts.append(trail)


def plain_text(text: str, language: str) -> Document:
    parts: list[str] = []
    segments: list[int] = []
    _add_sentences(parts, segments, text, language)
    return Document(parts, segments)


class _HtmlParts(HTMLParser):
    """Markup kept as written; text nodes cut into sentences unless inside a skipped element."""

    def __init__(self, language: str):
        super().__init__(convert_charrefs=True)
        self.language = language
        self.parts: list[str] = []
        self.segments: list[int] = []
        self.skipping: list[str] = []  # open elements whose text is not translated

    def handle_starttag(self, tag, attrs):
        self.parts.append(self.get_starttag_text() or "")
        no = tag in SKIPPED_ELEMENTS or any(k == "translate" and (v or "").lower() == "no" for k, v in attrs)
        if (no or self.skipping) and tag not in VOID_ELEMENTS:
            self.skipping.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.parts.append(self.get_starttag_text() or "")

    def handle_endtag(self, tag):
        self.parts.append(f"</{tag}>")
        if tag in self.skipping:  # close it and anything left open inside it
            del self.skipping[len(self.skipping) - 1 - self.skipping[::-1].index(tag):]

    def handle_data(self, data):
        if self.skipping or not any(ch.isalpha() for ch in data):
            self.parts.append(data if self.skipping else html.escape(data, quote=False))
            return
        _add_sentences(self.parts, self.segments, data, self.language)  # whitespace needs no escaping

    def handle_comment(self, data):
        self.parts.append(f"<!--{data}-->")

    def handle_decl(self, decl):
        self.parts.append(f"<!{decl}>")

    def handle_pi(self, data):
        self.parts.append(f"<?{data}>")

    def unknown_decl(self, data):
        self.parts.append(f"<![{data}]>")


def html_text(text: str, language: str) -> Document:
    parser = _HtmlParts(language)
    parser.feed(text)
    parser.close()
    return Document(parser.parts, parser.segments, escape=True)


def document(text: str, language: str, format: str) -> Document:
    """``text`` cut for translation; ``format`` is "text" or "html"."""
    return html_text(text, language) if format == "html" else plain_text(text, language)
