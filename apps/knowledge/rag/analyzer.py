"""One text analyzer for BM25, used for documents and queries alike (pure Python, no Django).

Pipeline (``Analyzer.tokenize``):

1. **Normalise**: Unicode NFKC (full-width ``ＡＢＣ１２３，`` becomes ``ABC123,``; half-width katakana
   becomes full-width), lower case, traditional -> simplified Chinese with mainland vocabulary
   (zhconv's ``zh-cn`` table: 軟體 -> 软件, 網路 -> 网络), applied only when the text has Han characters.
2. **Split** into Han runs and the rest. Han runs are segmented by jieba in search mode (a long
   word also yields its dictionary sub-words: 中华人民共和国 -> 中华, 华人, 人民, 共和, 共和国, ...).
   The rest is cut into words on non-word characters.
3. **Identifiers and numbers are kept**: a run such as ``__init__``, ``3.11``, ``v1.2.3``, ``2*3*4``,
   ``os.path.join``, ``E1234`` or ``c++`` is emitted whole (unstemmed) beside its word
   parts (``os``, ``path``, ``join``); an underscore identifier (``__init__``, ``max_connections``)
   is one token. Plain English words and hyphenated words without
   digits are tokenized exactly as the English-only tokenizer before this one did.
4. **Stopwords** for English (bm25s' list and the question words of colloquial questions: how, what,
   do, my, ...) and Chinese (function words and question words of colloquial questions: 的, 了, 怎么,
   如何, 请问, ...); single Latin letters are dropped, single Han characters are kept (税, 车 carry
   meaning).
5. **Stem** Latin words (Snowball English, PyStemmer).

A per-knowledge-base **user dictionary** (domain terms: product and policy names) changes the
tokens: an all-Han term is added to a private jieba tokenizer so segmentation keeps it whole; a term
with Latin letters, digits or spaces (``Premium Care Plus``, ``微信支付V3``) is also emitted as one
extra token wherever it occurs. The dictionary is part of the analyzer's identity:
:attr:`Analyzer.spec` (name, version, dictionary hash and terms) is stored with each BM25 index so
that its queries are tokenized by exactly the analyzer its documents were.

Bump :data:`ANALYZER_VERSION` whenever a change alters any token; an index built with another
name or version is not searched by BM25 and is rebuilt (see ``index.BM25Index.load``).
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

ANALYZER_NAME = "kotaemon-zh-en"
ANALYZER_VERSION = 3  # 2: snake_case / dunder identifiers without their parts; 3: English question words

_HAN = "\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef\U00030000-\U0003134f"
_HAN_CHAR = re.compile(f"[{_HAN}]")
_WORD_CHAR = rf"[^\W{_HAN}]"
# A Han run, or a word run with inner joiners (3.11, os.path, 2*3*4, covid-19, c++, a#b, user@host).
_TOKEN = re.compile(
    rf"(?P<han>[{_HAN}]+)|(?P<word>{_WORD_CHAR}+(?:[.*+:#@/\-]{{1,2}}{_WORD_CHAR}+)*(?:\+\+|#(?!\w))?)"
)
_NON_WORD = re.compile(r"\W")
_PART = re.compile(rf"{_WORD_CHAR}{_WORD_CHAR}+")
_SIMPLE_WORD = re.compile(r"[^\W\d_]+")

# Function words and the question words of colloquial questions: they occur everywhere, or only in
# questions, never in the passage that answers one.
ZH_STOPWORDS = frozenset(
    """
    的 地 得 了 着 过 和 与 及 或 或者 而 而且 并 并且 但 但是 可是 然而 因为 所以 因此 如果 假如 虽然 即使
    是 在 于 对 对于 把 被 让 给 从 向 往 到 以 为 为了 由 由于 关于 按照 根据 通过 除了 之 其 此 该 这 那
    这个 那个 这些 那些 这样 那样 这里 那里 这么 那么 这种 那种 一个 一些 一种 一下 有些 某 各 每 所有 任何
    我 你 您 他 她 它 我们 你们 他们 她们 它们 咱们 自己 大家 人家
    吗 呢 吧 啊 呀 哦 嗯 哈 嘛 啦 呗 么 哪 哪些 哪个 哪里 哪儿 什么 怎么 怎么样 怎样 如何 为什么 为何 多少 几
    是否 是不是 能否 能不能 可否 可以 可不可以 请问 请 想 想要 要 需要 应该 应当 会 能 能够 得到
    也 都 还 又 就 才 只 只是 已 已经 曾 将 将要 正 正在 很 太 更 最 非常 比较 十分 特别 再 不 没 没有 无
    有 有没有 个 些 等 等等 啥 咋 呃 一 上 下 中 里 后 前 时 时候 之后 之前 以后 以前
    """.split()
)


# The question and pronoun words of colloquial English questions ("how do I ...", "can my ..."), as the
# Chinese list has 怎么 and 我: in a question they match every chunk that happens to say "you" or "how".
# Measured on BM25 alone (docs/benchmarks.md, "Fusion by model"): MRR@10 up on all four development sets
# and SciFact nDCG@10 0.6844 -> 0.6888. Words that are also names or units once lower-cased are kept:
# may, might (May), who (WHO), us (US), am (9 am).
EN_QUESTION_WORDS = frozenset(
    """
    what which whom whose how why when where do does did doing done can could should would must shall
    me my mine myself you your yours yourself we our ours he him his she her its them what's i'm i've
    don't doesn't can't isn't there's it's been being have has had get got any some
    """.split()
)


def _english_stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN) | EN_QUESTION_WORDS


def parse_user_dictionary(text: str) -> tuple[str, ...]:
    """Terms from an editor's dictionary text: one term per line, ``#`` starts a comment line;
    blank lines and duplicates (after normalisation) are ignored."""
    terms: dict[str, None] = {}
    for line in (text or "").splitlines():
        line = " ".join(line.split())
        if line and not line.startswith("#"):
            term = normalize(line)
            if term:
                terms[term] = None
    return tuple(terms)


def normalize(text: str) -> str:
    """NFKC, lower case, traditional -> simplified (mainland vocabulary) when Han is present."""
    text = unicodedata.normalize("NFKC", text).lower()
    if _HAN_CHAR.search(text):
        import zhconv

        text = zhconv.convert(text, "zh-cn")
    return text


class Analyzer:
    """A configured analyzer: immutable, thread-safe, cheap to share (see :func:`get_analyzer`)."""

    def __init__(self, user_terms: Iterable[str] = ()) -> None:
        terms = sorted({normalize(" ".join(term.split())) for term in user_terms} - {""})
        self.user_terms: tuple[str, ...] = tuple(terms)
        self.dictionary_hash = hashlib.sha256("\n".join(self.user_terms).encode("utf-8")).hexdigest()
        self._han_terms = tuple(t for t in self.user_terms if _is_all_han(t))
        phrases = sorted((t for t in self.user_terms if not _is_all_han(t)), key=len, reverse=True)
        self._phrases = re.compile("|".join(_phrase_pattern(p) for p in phrases)) if phrases else None
        self._english_stopwords = _english_stopwords()
        self._jieba: Any = None
        self._jieba_lock = threading.Lock()
        self._stemmers = threading.local()

    name = ANALYZER_NAME
    version = ANALYZER_VERSION

    @property
    def spec(self) -> dict[str, Any]:
        """What an index records: enough to tell a mismatch and to rebuild this exact analyzer."""
        return {"name": self.name, "version": self.version, "user_dictionary_sha256": self.dictionary_hash,
                "user_terms": list(self.user_terms)}

    @property
    def identity(self) -> str:
        """Short stable id (name, version, dictionary hash), e.g. for cache keys and fingerprints."""
        return f"{self.name}/{self.version}/{self.dictionary_hash[:16]}"

    def tokenize(self, text: str) -> list[str]:
        text = normalize(text)
        tokens: list[str] = []
        plain: list[str] = []  # Latin words to stem, in one batch
        stop_en = self._english_stopwords
        for match in _TOKEN.finditer(text):
            han = match.group("han")
            if han is not None:
                if plain:
                    tokens.extend(self._stem(plain))
                    plain = []
                tokens.extend(w for w in self._segmenter().cut_for_search(han) if w not in ZH_STOPWORDS)
                continue
            word = match.group("word")
            if _SIMPLE_WORD.fullmatch(word):
                if len(word) > 1 and word not in stop_en:
                    plain.append(word)
                continue
            if plain:
                tokens.extend(self._stem(plain))
                plain = []
            tokens.extend(self._compound(word, stop_en))
        if plain:
            tokens.extend(self._stem(plain))
        if self._phrases is not None:
            tokens.extend(" ".join(m.group(0).split()) for m in self._phrases.finditer(text))
        return tokens

    def _compound(self, word: str, stop_en: frozenset[str]) -> list[str]:
        """``word`` holds digits, underscores or joiners: keep it whole where it is an identifier or a
        number, plus its word parts as plain words (``os.path.join`` also gives ``os``, ``path``, ``join``).
        A run joined only by hyphens or slashes (``state-of-the-art``, ``covid-19``, ``and/or``) gives only
        its parts, as the English tokenizer did: on SciFact the whole hyphenated run cost 0.001 nDCG@10."""
        out: list[str] = []
        whole = word.strip("-/")
        joiners = set(_NON_WORD.findall(whole))
        if "_" in whole and not joiners:
            # snake_case and dunder identifiers stay one token, as the English tokenizer kept them:
            # adding their parts cost 0.02 hit@3 on the Debian sets (longer chunks, diluted scores).
            return [whole]
        if len(whole) > 1 and (not joiners or not joiners <= {"-", "/"}):
            out.append(whole)
        parts = [p for p in _PART.findall(word.replace("_", " ")) if p not in stop_en]
        simple = [p for p in parts if p != whole]
        if simple:
            letters = [p for p in simple if _SIMPLE_WORD.fullmatch(p)]
            others = [p for p in simple if not _SIMPLE_WORD.fullmatch(p)]
            out.extend(self._stem(letters))
            out.extend(others)
        return out

    def _stem(self, words: Sequence[str]) -> list[str]:
        if not words:
            return []
        stemmer = getattr(self._stemmers, "stemmer", None)
        if stemmer is None:  # PyStemmer objects are not thread-safe: one per thread
            import Stemmer

            stemmer = Stemmer.Stemmer("english")
            self._stemmers.stemmer = stemmer
        return stemmer.stemWords(list(words))

    def _segmenter(self) -> Any:
        if self._jieba is None:
            with self._jieba_lock:
                if self._jieba is None:
                    self._jieba = _segmenter_with(self._han_terms)
        return self._jieba


def _is_all_han(term: str) -> bool:
    return bool(term) and all(_HAN_CHAR.fullmatch(c) for c in term)


def _phrase_pattern(term: str) -> str:
    """A literal term; Latin edges must not be inside a longer word (``plus`` is not in ``surplus``)."""
    pattern = re.escape(term).replace(r"\ ", r"\s+")
    if re.match(r"\w", term) and not _HAN_CHAR.match(term):
        pattern = r"(?<![^\W" + _HAN + r"])" + pattern
    if re.search(r"\w$", term) and not _HAN_CHAR.match(term[-1]):
        pattern = pattern + r"(?![^\W" + _HAN + r"])"
    return pattern


# --------------------------------------------------------------------------------------------
# jieba: the dictionary is loaded once per process, quietly; a user dictionary gets a private
# tokenizer that copies the base frequency table (about 5 MB, 15 ms) instead of reloading it.
# --------------------------------------------------------------------------------------------

_BASE_LOCK = threading.Lock()
_BASE: Any = None


def _base_segmenter() -> Any:
    global _BASE
    if _BASE is None:
        with _BASE_LOCK:
            if _BASE is None:
                import jieba

                # jieba logs "Building prefix dict ..." to stderr at INFO on every load.
                logging.getLogger("jieba").setLevel(logging.WARNING)
                jieba.setLogLevel(logging.WARNING)
                tokenizer = jieba.Tokenizer()
                tokenizer.initialize()
                _BASE = tokenizer
    return _BASE


def _segmenter_with(han_terms: Sequence[str]) -> Any:
    base = _base_segmenter()
    if not han_terms:
        return base
    import jieba

    tokenizer = jieba.Tokenizer()
    with _BASE_LOCK:
        tokenizer.FREQ, tokenizer.total = dict(base.FREQ), base.total
    tokenizer.initialized = True
    for term in han_terms:
        tokenizer.add_word(term)
        tokenizer.suggest_freq(term, tune=True)
    return tokenizer


_CACHE_SIZE = 32
_cache: OrderedDict[tuple[str, ...], Analyzer] = OrderedDict()
_cache_lock = threading.Lock()


def get_analyzer(user_terms: Iterable[str] = ()) -> Analyzer:
    """The shared analyzer for this dictionary (an LRU of recently used dictionaries)."""
    key = tuple(sorted(set(user_terms)))
    with _cache_lock:
        analyzer = _cache.get(key)
        if analyzer is not None:
            _cache.move_to_end(key)
            return analyzer
    analyzer = Analyzer(key)
    with _cache_lock:
        analyzer = _cache.setdefault(key, analyzer)
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return analyzer


def analyzer_from_spec(spec: dict[str, Any] | None) -> Analyzer | None:
    """The analyzer an index was built with, or None when this code cannot reproduce it (another
    analyzer name or version: the index must be rebuilt, not searched with a different tokenizer)."""
    if not spec or spec.get("name") != ANALYZER_NAME or spec.get("version") != ANALYZER_VERSION:
        return None
    analyzer = get_analyzer(spec.get("user_terms") or ())
    if analyzer.dictionary_hash != spec.get("user_dictionary_sha256"):
        return None
    return analyzer


def spec_matches(spec: dict[str, Any] | None, analyzer: Analyzer) -> bool:
    """True when an index recorded ``spec`` is what ``analyzer`` would build now."""
    return bool(spec) and spec.get("name") == analyzer.name and spec.get("version") == analyzer.version \
        and spec.get("user_dictionary_sha256") == analyzer.dictionary_hash
