"""Abbreviations a document defines, so that a question using one form finds a chunk using the other.

Definitions recognised (the short form in parentheses after the long form):

- ``Write-Ahead Log (WAL)``, ``General Data Protection Regulation ("GDPR")``, ``the Service Level
  Agreement (the "SLA")``: the long form is the shortest run of words before the parenthesis whose
  initials spell the short form's letters in order (a simplified Schwartz-Hearst match: the first
  letters must agree, every letter of the short form must occur in order);
- ``个人所得税（个税）``, ``中华人民共和国劳动合同法（以下简称“劳动合同法”）``: the long form is the Han run
  before the parenthesis from the last character where the short form's characters still occur in
  order (so ``缴纳个人所得税（个税）`` gives 个人所得税).

:func:`expansions_for` gives, for one chunk, the form it lacks of every abbreviation it uses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_LATIN_DEFINITION = re.compile(
    r"((?:[\w'’-]+[ \t]+){0,12}[\w'’-]+)[ \t]*\((?:the[ \t]+)?[\"“'‘]?([A-Za-z][A-Za-z0-9&./-]{1,11})[\"”'’]?\)"
)
_HAN_DEFINITION = re.compile(
    rf"([{_HAN}]{{3,30}})[（(](以下)?(简称|下称)?[：:]?[\"“「『]?([{_HAN}A-Za-z0-9]{{2,12}})[\"”」』]?[）)]"
)
_HAN_LEAD = re.compile(r"^(?:根据|依据|按照|依照|按|依|对于|对|在|为|由|与|和|及|经|将|把|是)")
_SMALL_WORDS = frozenset({"of", "and", "for", "the", "on", "in", "to", "a", "an", "&", "de", "du"})


@dataclass(frozen=True)
class Abbreviation:
    short: str
    long: str


def find_abbreviations(text: str, *, limit: int = 200) -> list[Abbreviation]:
    """Abbreviations defined in ``text``, first definition of each short form wins."""
    found: dict[str, Abbreviation] = {}
    for match in _LATIN_DEFINITION.finditer(text):
        short = match.group(2).rstrip("./-")
        if short in found or not _looks_like_acronym(short):
            continue
        long = _latin_long_form(match.group(1).split(), short)
        if long:
            found[short] = Abbreviation(short, long)
    for match in _HAN_DEFINITION.finditer(text):
        short = match.group(4)
        if short in found:
            continue
        if match.group(3):  # "以下简称": the whole name before it, without a leading preposition
            long = _HAN_LEAD.sub("", match.group(1))
            long = long if long != short and len(long) > len(short) else None
        else:
            long = _han_long_form(match.group(1), short)
        if long:
            found[short] = Abbreviation(short, long)
    return list(found.values())[:limit]


def _looks_like_acronym(short: str) -> bool:
    letters = [c for c in short if c.isalpha()]
    return len(letters) >= 2 and sum(c.isupper() for c in letters) >= max(2, len(letters) // 2)


def _latin_long_form(words: list[str], short: str) -> str | None:
    """The shortest suffix of ``words`` (at most len(short) + 5 words) spelled by ``short``."""
    letters = [c.lower() for c in short if c.isalnum()]
    if not letters:
        return None
    for size in range(1, min(len(words), len(letters) + 5) + 1):
        candidate = words[-size:]
        while candidate and candidate[0].lower() in _SMALL_WORDS:
            candidate = candidate[1:]
        if not candidate or candidate[0][:1].lower() != letters[0]:
            continue
        if _spells(letters, " ".join(candidate).lower()) and len(candidate) >= min(2, len(letters)):
            return " ".join(candidate)
    return None


def _spells(letters: list[str], long: str) -> bool:
    """Every letter occurs in order; the first letter starts a word (checked by the caller)."""
    position = 0
    for letter in letters:
        position = long.find(letter, position)
        if position < 0:
            return False
        position += 1
    return True


def _han_long_form(run: str, short: str) -> str | None:
    if short == run or not all(_is_han(c) for c in short):
        return None
    for start in range(len(run) - len(short), -1, -1):
        if run[start] == short[0] and _spells(list(short), run[start:]) and len(run) - start > len(short):
            return run[start:]
    return None


def _is_han(c: str) -> bool:
    return "\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff"


def expansions_for(text: str, abbreviations: list[Abbreviation]) -> list[str]:
    """For each abbreviation that ``text`` uses in one form only, the other form."""
    out: list[str] = []
    lowered = text.lower()
    for abbreviation in abbreviations:
        has_short = _contains_word(text, abbreviation.short)
        has_long = abbreviation.long.lower() in lowered
        if has_short and not has_long:
            out.append(abbreviation.long)
        elif has_long and not has_short:
            out.append(abbreviation.short)
    return out


def _contains_word(text: str, word: str) -> bool:
    if _is_han(word[0]):
        return word in text
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


# Words a title carries besides its name: "Mozilla Public License Version 2.0" is the MPL.
_TITLE_STOP = frozenset({"version", "edition", "revision", "release", "draft", "v"})
# What the name of a document people abbreviate ends with: licences, agreements, laws, standards.
_DOCUMENT_NOUNS = frozenset({
    "license", "licence", "agreement", "act", "regulation", "regulations", "policy", "law", "code",
    "contract", "standard", "specification", "protocol", "directive", "convention", "treaty", "charter",
    "framework", "guidelines", "procedure", "procedures", "terms", "conditions", "statement", "notice",
    "handbook", "manual",
})
_TITLE_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")


def title_acronyms(title: str) -> list[str]:
    """Short forms people use for a document whose whole title is a name of 3 to 8 capitalised words
    ending in a document noun (License, Agreement, Act, Regulation, Policy, ...): the initials, small
    words skipped, a version after the name ignored ("Mozilla Public License Version 2.0" -> MPL;
    "General Data Protection Regulation" -> GDPR), and for a leading all-capitals word the initials
    without it too ("GNU General Public License" -> GGPL, GPL). None for any other title (a paper's
    title in Title Case is not a name anyone abbreviates)."""
    name: list[str] = []
    tokens = title.replace("\u2013", " ").replace("\u2014", " ").split()
    for position, token in enumerate(tokens):
        word = token.strip("()[]{}:;,.\"'“”‘’")
        if not word:
            continue
        if word.lower() in _TITLE_STOP or not _TITLE_WORD.fullmatch(word):
            # The name is over: only a version (words like "Version", numbers) may follow it.
            rest = tokens[position:]
            if not name or any(_TITLE_WORD.fullmatch(t.strip("(),.")) and t.strip("(),.").lower() not in _TITLE_STOP
                               for t in rest):
                return []
            break
        if word.lower() in _SMALL_WORDS:
            continue
        if not word[0].isupper():
            return []
        name.append(word)
    if not 3 <= len(name) <= 8 or name[-1].lower() not in _DOCUMENT_NOUNS:
        return []
    forms = ["".join(w[0] for w in name).upper()]
    if name[0].isupper() and len(name[0]) > 1 and len(name) >= 4:
        forms.append("".join(w[0] for w in name[1:]).upper())
    return list(dict.fromkeys(forms))
