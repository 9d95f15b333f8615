"""The seed's WikiText rules: the detokenizer applied to the whole file, then paragraphs without headings.

`clean_wikitext` is the whole-file rewrite in the seed's order. Large files are cleaned in chunks; a chunk may only
end where cleaning chunk by chunk gives exactly the whole-file result (`wiki_cut`), see `clean_chunk`.
"""

from __future__ import annotations

import re

# The bracket and quote trims: non-greedy, so each opener pairs with the next closer anywhere after it (even in a
# later paragraph); only the whitespace just inside the pair is removed.
_TRIMS = [
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
]
_BEFORE_TRIMS = [
    ("s '", "s'"),
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
]
_AFTER_TRIMS = [
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \u00b0 ", "\u00b0"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]
PARAGRAPH_SEPARATOR = "\n\n"


def clean_wikitext(text: str) -> str:
    """The WikiText detokenizer exactly as the seed applies it to a whole file (each rule over all the text)."""
    for old, new in _BEFORE_TRIMS:
        text = text.replace(old, new)
    for pattern, repl in _TRIMS:
        text = pattern.sub(repl, text)
    for old, new in _AFTER_TRIMS:
        text = text.replace(old, new)
    return text


def clean_chunk(chunk: str, first: bool) -> str:
    """Cleaned text of one chunk of a file; the cleaned chunks concatenated equal `clean_wikitext(whole file)`.

    Every chunk but the first starts right after a newline cut by `wiki_cut`. Only the rule "\\n " -> "\\n" can reach
    across such a cut (it removes the space that opens the next chunk), so each later chunk is cleaned with that
    newline in front of it, which is then taken off again.
    """
    if first:
        return clean_wikitext(chunk)
    return clean_wikitext("\n" + chunk)[1:]


_PAIRS = (("(", ")"), ("[", "]"), ("{", "}"))


def wiki_cut(text: str, lo: int = 0) -> int:
    """The last cut e > lo, just after a newline, such that text[:e] is balanced; -1 if there is none.

    `text` must start at a balanced point. Balanced: an even number of '"' and of "'" (quotes pair up first with
    second, third with fourth ...) and no '(' '[' '{' after the last ')' ']' '}' — so no bracket or quote trim can
    span the cut and the chunks clean independently.
    """
    quotes = {q: text.count(q) for q in ('"', "'")}
    end = len(text)
    while True:
        nl = text.rfind("\n", lo, end)
        if nl < 0:
            return -1
        cut = nl + 1
        for q in quotes:  # counts of text[:cut], kept by subtracting the part just passed
            quotes[q] -= text.count(q, cut, end)
        if not (quotes['"'] % 2 or quotes["'"] % 2) and all(
            text.rfind(o, 0, cut) <= text.rfind(c, 0, cut) for o, c in _PAIRS
        ):
            return cut
        end = nl  # the newline itself holds no quote, so the counts stay those of text[:end]


def is_heading(paragraph: str) -> bool:
    """Headings (any level) are dropped, as the seed does: the stripped paragraph starts with '='."""
    return paragraph.strip().startswith("=")


def is_article_heading(paragraph: str) -> bool:
    """A top-level heading ' = Title = ' starts a new article; section headings read '== Title =='."""
    stripped = paragraph.strip()
    return stripped.startswith("=") and not stripped.startswith("==")
