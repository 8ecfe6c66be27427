"""The default generator: no model. It picks the sentences of the top sources that best cover the
question and returns them in source order with [n] citations. It never writes a sentence that is
not in a source; when no sentence covers the question well enough it says so plainly, in the language
of the question (or the interface's, when the question does not tell).

Chinese text is split into sentences at 。！？；… (no space needed), its terms are the words of the
platform's analyzer (jieba, search mode) minus question phrasing, Chinese sentences are joined without
spaces, and a citation goes before the closing punctuation: 七个工作日内到账[1]。
"""
from __future__ import annotations

import math
import re
import threading

from django.utils import translation
from django.utils.translation import gettext_lazy

from apps.core.i18n import reply_language

from .base import Generation, Generator, Source, TokenCallback

NOT_FOUND = gettext_lazy("I could not find anything about that in the knowledge bases you can search. "
                         "Try rephrasing the question or naming the document or topic.")

_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’-]*")
_SENTENCE_RE = re.compile(r"(?<=[.!?])[\"”')\]]*\s+(?=[\"“(\[]?[A-Z0-9])")
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAN_RE = re.compile(f"[{_HAN}]")
_HAN_RUN_RE = re.compile(f"[{_HAN}]+")
# A Chinese sentence ends at 。！？； or an ellipsis, with any closing quotes or brackets; no space follows.
_ZH_SENTENCE_RE = re.compile(r"(?<=[。！？；])(?![。！？；”’」』）】])|(?<=[。！？；][”’」』）】])|(?<=……)(?!…)")
# Line breaks inside Chinese text are layout, not word boundaries.
_HAN_GAP_RE = re.compile(f"(?<=[{_HAN}，。！？；：、”’」』）])\\s+(?=[{_HAN}，。！？；：、“‘「『（])")
_ZH_END_RE = re.compile(r"[。！？；：…]+[”’」』）】]*$")
_ZH_CLOSING = "。！？；：…，、”’」』）】"
_STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most
mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same shan't
she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves then
there there's these they they'd they'll they're they've this those through to too under until up very was
wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's
whom why why's with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
""".split()) | frozenset(
    # Phrasing of a question ("how long does it take", "please tell me") that rarely appears in the
    # sentence that answers it; counting it would make good answers look weak.
    "also please tell know explain get got give us many much long take takes taking".split())
# The analyzer drops Chinese function and question words (怎么, 请问, 多少...); these are the phrasing of a
# Chinese question that its answer rarely repeats ("多长时间" is answered by "7个工作日内").
_ZH_PHRASING = frozenset("多久 多长 多长时间 长时间 时间 才能 能否 需要 告诉 知道 问问 问下 问一下 一下 办法 情况 时候 的话 麻烦 谢谢".split())

# Answer types: a question asking "how long" is best answered by a sentence holding a duration.
_ANSWER_TYPES = [
    (re.compile(r"\bhow (long|soon|quickly|fast)\b|\bwhen\b|\bdeadline\b|\bturnaround\b", re.I),
     re.compile(r"\b\d+(\s*(-|to)\s*\d+)?\s*(business |working |calendar )?(second|minute|hour|day|week|month|year)s?\b"
                r"|\b(one|two|three|four|five|six|seven|ten|fourteen|thirty)\s+(business |working )?(day|week|month|hour)s?\b"
                r"|\bwithin\b|\bimmediately\b|\bsame day\b", re.I)),
    (re.compile(r"\bhow much\b|\bcost\b|\bprice\b|\bfee\b|\bcharge\b", re.I),
     re.compile(r"[$€£¥]\s?\d|\b\d+([.,]\d+)?\s?(usd|eur|euros?|dollars?|pounds?|gbp)\b|\bfree\b", re.I)),
    (re.compile(r"\bhow many\b|\bnumber of\b", re.I), re.compile(r"\b\d+\b")),
    (re.compile(r"多久|多长时间|几天|几个工作日|什么时候|何时|期限|时限|多快|多长"),
     re.compile(r"\d+\s*(个)?(工作日|自然日|天|日|小时|分钟|周|星期|个月|月|年)"
                r"|[一二三四五六七八九十两半]+(个)?(工作日|自然日|天|小时|分钟|周|星期|个月|月|年)|立即|立刻|当天|即时|随时")),
    (re.compile(r"多少钱|费用|价格|收费|几块|多少元|手续费"),
     re.compile(r"[¥￥]\s?\d|\d+(\.\d+)?\s*(元|块|人民币)|免费|不收费|不收取")),
    (re.compile(r"多少|几个|几次|几家"), re.compile(r"\d")),
]
ANSWER_TYPE_BONUS = 0.35

MIN_COVERAGE = 0.2
MAX_SENTENCES = 4
MAX_ANSWER_CHARS = 900
MAX_SOURCES_CONSIDERED = 5

_stemmer = None
_stemmer_lock = threading.Lock()


def _stem_words(words: list[str]) -> list[str]:
    global _stemmer
    if _stemmer is None:
        with _stemmer_lock:
            if _stemmer is None:
                import Stemmer

                _stemmer = Stemmer.Stemmer("english")
    with _stemmer_lock:  # PyStemmer objects are not thread-safe
        return _stemmer.stemWords(words)


def _han_terms(text: str) -> list[str]:
    """Words of the Chinese runs of `text`, segmented by the platform's analyzer (as BM25 sees them)."""
    from apps.knowledge.rag.analyzer import get_analyzer

    runs = " ".join(_HAN_RUN_RE.findall(text))
    return [t for t in get_analyzer().tokenize(runs) if t not in _ZH_PHRASING]


def terms(text: str) -> list[str]:
    words = [w.lower().replace("’", "'").strip("'-") for w in _WORD_RE.findall(text)]
    words = [w for w in words if w and w not in _STOPWORDS and (len(w) > 1 or w.isdigit())]
    stemmed = _stem_words(words)
    return stemmed + _han_terms(text) if _HAN_RE.search(text) else stemmed


def is_chinese(sentence: str) -> bool:
    return bool(_HAN_RE.search(sentence))


def _size(sentence: str) -> int:
    """Roughly the number of words: Latin words, and two Han characters to a word."""
    return len(_WORD_RE.findall(sentence)) + len(_HAN_RE.findall(sentence)) // 2


def split_sentences(text: str) -> list[str]:
    sentences: list[str] = []
    for block in re.split(r"\n\s*\n|\n(?=\s*(?:[-*•]|\d+[.)、])\s?)", text):
        block = _HAN_GAP_RE.sub("", " ".join(block.split()))
        if not block:
            continue
        for part in _SENTENCE_RE.split(block):
            sentences.extend(s.strip() for s in _ZH_SENTENCE_RE.split(part) if s.strip())
    return sentences


def _cite(sentence: str, n: int) -> str:
    sentence = sentence.strip()
    if is_chinese(sentence):
        # The marker belongs to the sentence: before its closing punctuation, no space (…完成[1]。).
        m = _ZH_END_RE.search(sentence) or re.search(r"[.!?:;]+[\"”')\]]*$", sentence)
        if m:
            return f"{sentence[:m.start()].rstrip()}[{n}]{sentence[m.start():]}"
        return f"{sentence}[{n}]。"
    m = re.search(r"[.!?:;]+[\"”')\]]*$", sentence)
    if m:
        return f"{sentence[:m.start()].rstrip()} [{n}]{sentence[m.start():]}"
    return f"{sentence} [{n}]."


def join_sentences(parts: list[str]) -> str:
    """Sentences in order: a space between Latin ones, none after or before a Chinese one."""
    out = ""
    for part in parts:
        if out and not (out[-1] in _ZH_CLOSING or _HAN_RE.match(out[-1]) or _HAN_RE.match(part[0])
                        or part[0] in _ZH_CLOSING):
            out += " "
        out += part
    return out


def stream_pieces(text: str) -> list[str]:
    """Word-sized pieces for streaming: Latin words with their space, Chinese in short clause runs."""
    return re.findall(f"[{_HAN}]{{1,4}}[{_ZH_CLOSING}]*|[^\\s{_HAN}]+\\s*|\\s+", text)


class ExtractiveGenerator(Generator):
    name = "extractive"

    def generate(self, *, question: str, query: str, history: list[dict], sources: list[Source],
                 on_token: TokenCallback | None = None) -> Generation:
        previous = next((t.get("content") or "" for t in reversed(history) if t.get("role") == "assistant"), "")
        text, snippets = self.answer(question=question, query=query, sources=sources,
                                     said_before=re.sub(r"\s*\[\d+\]", "", previous))
        text = str(text)
        if on_token is not None:
            # Word-sized pieces keep the streaming contract identical to the LLM generators.
            for piece in stream_pieces(text):
                on_token(piece)
        return Generation(text=text, generator=self.name, prompt_tokens=0, completion_tokens=0, snippets=snippets)

    def answer(self, *, question: str, query: str, sources: list[Source],
               said_before: str = "") -> tuple[str, dict[int, str]]:
        """`said_before` is the previous answer: repeating its sentences to a follow-up says nothing new."""
        # The message's own words weigh more than words carried over from earlier turns.
        own = terms(question)
        context = [t for t in terms(query) if t not in set(own)]
        weights_q: dict[str, float] = {}
        for t in own:
            weights_q[t] = 1.0
        for t in context:
            weights_q.setdefault(t, 0.6)
        plugin_sources = [s for s in sources if s.type == "plugin"]
        chunk_sources = [s for s in sources if s.type != "plugin"][:MAX_SOURCES_CONSIDERED]

        candidates: list[tuple[int, int, int, str, set[str]]] = []  # (rank, n, position, sentence, terms)
        for rank, source in enumerate(chunk_sources):
            # A sentence is about its section: "How to start a return" is what step 2 of it answers.
            section_terms = set(terms(re.split(r"\s*[›>]\s*", source.heading)[-1])) if source.heading else set()
            for pos, sentence in enumerate(split_sentences(source.text)):
                if (len(sentence) < 6 or _size(sentence) < 3) if is_chinese(sentence) else \
                        (len(sentence) < 12 or len(sentence.split()) < 3):
                    continue  # fragments
                if not re.search(r"[.!?:;)\]\"”。！？；：）」』】…]$", sentence) and _size(sentence) < 8:
                    continue  # a heading line: the citation shows the heading anyway
                own_terms = set(terms(sentence))
                # ...but only a sentence that itself speaks to the question takes its heading's words.
                if own_terms & weights_q.keys():
                    own_terms |= section_terms
                candidates.append((rank, source.n, pos, sentence, own_terms))

        picked: list[tuple[int, int, str]] = []  # (n, position, sentence)
        # Plugin results were chosen by the intent router for this message: they lead the answer.
        for source in plugin_sources:
            first = split_sentences(source.text)[:2]
            for pos, sentence in enumerate(first):
                picked.append((source.n, pos, sentence))

        if weights_q and candidates:
            n_docs = len(candidates)
            df: dict[str, int] = {}
            for *_, sentence_terms in candidates:
                for t in sentence_terms & weights_q.keys():
                    df[t] = df.get(t, 0) + 1
            idf = {t: math.log(1 + n_docs / (1 + df.get(t, 0))) for t in weights_q}
            # A question word no source sentence contains still counts against coverage, but less:
            # it is often phrasing ("cost", "price") rather than substance.
            total = sum(weights_q[t] * idf[t] * (1.0 if df.get(t) else 0.5) for t in weights_q) or 1.0
            wanted_types = [answer for asks, answer in _ANSWER_TYPES if asks.search(question)]
            scored = []
            for rank, n, pos, sentence, sentence_terms in candidates:
                matched = sentence_terms & weights_q.keys()
                coverage = sum(weights_q[t] * idf[t] for t in matched) / total
                if matched and any(answer.search(sentence) for answer in wanted_types):
                    coverage = min(1.0, coverage + ANSWER_TYPE_BONUS)
                if said_before and sentence.rstrip(".!?。！？；") in said_before:
                    coverage *= 0.5
                prior = 1.0 / (1.0 + 0.25 * rank)  # the retriever's order breaks near-ties
                scored.append((coverage * (0.75 + 0.25 * prior), coverage, n, pos, sentence))
            scored.sort(key=lambda s: -s[0])
            best = scored[0][1] if scored else 0.0
            if best >= MIN_COVERAGE:
                length = 0
                for score, coverage, n, pos, sentence in scored:
                    if len(picked) >= MAX_SENTENCES + len(plugin_sources) * 2:
                        break
                    if coverage < max(MIN_COVERAGE, 0.5 * best):
                        break
                    if any(sentence == p[2] for p in picked):
                        continue
                    if length + len(sentence) > MAX_ANSWER_CHARS and picked:
                        continue
                    picked.append((n, pos, sentence))
                    length += len(sentence)

        if not picked:
            with translation.override(reply_language(question)):
                return str(NOT_FOUND), {}
        picked.sort(key=lambda p: (p[0], p[1]))
        by_source: dict[int, list[str]] = {}
        parts = []
        for n, _pos, sentence in picked:
            by_source.setdefault(n, []).append(sentence)
            parts.append(_cite(sentence, n))
        return join_sentences(parts), {n: join_sentences(s) for n, s in by_source.items()}
