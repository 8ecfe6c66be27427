"""The language mix of a text, and the rule that turns a knowledge base's mix into an embedding model choice.

Pure Python (no Django): the Django layer stores the counts per document, sums them per base and applies
`multilingual_needed`.

Counting unit: one **token** per CJK character (Han, kana, hangul) and one per run of other letters (a Latin
word). Counting letters instead would make Chinese look small: an English word averages about five letters,
a Chinese word one or two characters, so a base that is half Chinese by content is only ~20-25% CJK by
letters. Per token, a CJK character weighs a little less than a word, so Chinese content counts slightly
more than its share of words; that is the safe side, because the two mistakes cost very differently: an
English base on multilingual-e5-small loses a little (SciFact subset nDCG@10 0.874 -> 0.853; Debian en set
hybrid hit@3 equal), a Chinese base on all-MiniLM-L6-v2 loses its dense retrieval altogether (Debian zh set
dense hit@3 0.19 vs 0.58).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_CJK = "\u3007\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0003134f"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W\d_{_CJK}]+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")

# An undecided base (no vectors yet) takes the multilingual model from this CJK share on: a tenth of the
# text is Chinese when, for example, 2 of 20 equally long documents are (or every document mixes in some
# Chinese). Below it the text is English with a few Chinese names or terms.
MULTILINGUAL_SHARE = 0.10
# A base already embedded with the English model switches (a full background re-embed) only from twice
# that share: a clear change of the mix, not noise around the first threshold. The switch is one-way.
SWITCH_SHARE = 0.20
# Fewer tokens than this decide nothing (a title, a table of numbers): such documents are embedded with the
# base's current model and the next documents decide (a later switch re-embeds them, which is cheap).
MIN_TOKENS = 20
# A chunk is CJK text, for the dense search's correction of the multilingual model's language bias
# (rag/index.py), from this CJK share on; below it, text in Latin script with a few CJK names.
CJK_TEXT_SHARE = 0.20


@dataclass(frozen=True)
class LanguageMix:
    tokens: int = 0
    cjk: int = 0

    def __add__(self, other: "LanguageMix") -> "LanguageMix":
        return LanguageMix(self.tokens + other.tokens, self.cjk + other.cjk)

    @property
    def cjk_share(self) -> float:
        return self.cjk / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "cjk_tokens": self.cjk, "cjk_share": round(self.cjk_share, 4)}


def language_mix(text: str) -> LanguageMix:
    """Tokens of `text` (CJK characters and words of other letters; digits and punctuation not counted)."""
    if not text:
        return LanguageMix()
    tokens = _TOKEN.findall(text)
    cjk = sum(1 for token in tokens if len(token) == 1 and _CJK_CHAR.match(token))
    return LanguageMix(len(tokens), cjk)


def multilingual_needed(mix: LanguageMix, *, embedded_with_english_model: bool) -> bool:
    """Whether a base with this mix should use the multilingual model.

    `embedded_with_english_model`: the base already chose the English model on earlier documents, so a
    switch costs a re-embed and needs the higher SWITCH_SHARE (hysteresis). Never used to switch back:
    once multilingual, a base stays multilingual (the caller does not ask)."""
    threshold = SWITCH_SHARE if embedded_with_english_model else MULTILINGUAL_SHARE
    return mix.tokens > 0 and mix.cjk_share >= threshold


def script_group(text: str) -> int:
    """1 for CJK text, 0 for everything else (see CJK_TEXT_SHARE)."""
    return 1 if language_mix(text).cjk_share >= CJK_TEXT_SHARE else 0
