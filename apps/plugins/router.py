"""Intent router: which plugin intent, if any, a chat message asks for.

The message is embedded with the platform's embedding model and compared (cosine) with every
enabled intent's example utterances. An intent's score is the mean of its `top_k` best example
similarities (one lucky example alone is weak evidence). Out-of-scope "anchor" utterances (general
knowledge questions, small talk) compete as a pseudo-intent: a message closest to them goes to plain
RAG. An intent wins when its score clears `threshold` and beats the runner-up (anchors included) by
`margin`. A keyword pattern that matches adds `keyword_bonus` and its named groups become slots.

Example embeddings are cached by text, so a new config version re-embeds only new examples.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

NONE = "__none__"

# General questions the knowledge base answers, and small talk. Deliberately phrased like the
# hard negatives operators see (policy questions that share words with intents): they keep
# "what is the refund policy" away from refund_status. Not used anywhere in the evaluation sets.
DEFAULT_NONE_EXAMPLES = (
    "what is the refund policy",
    "how long does shipping usually take",
    "what does the policy say about late deliveries",
    "what is the company vacation policy",
    "how many days of annual leave does the company give",
    "how do I request time off",
    "how do I reset my password",
    "what are the office opening hours",
    "what does the handbook say about working from home",
    "explain how the pricing works",
    "summarize this document for me",
    "what is the warranty on this product",
    "how do I contact IT about a laptop problem",
    "what is the process for submitting expenses",
    "what are the security guidelines for passwords",
    "how does the onboarding process work",
    "what are the terms and conditions",
    "hello",
    "thank you",
    "who are you",
    "what can you do",
    "tell me a joke",
)


@dataclass(frozen=True)
class IntentSpec:
    plugin: str
    intent: str
    method: str
    priority: int = 0
    examples: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()


@dataclass
class RouteDecision:
    intent: str | None
    confidence: float
    handlers: list[IntentSpec] = field(default_factory=list)  # highest priority first
    slots: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""                                          # matched | below_threshold | ambiguous | none_closer | no_intents

    def to_dict(self) -> dict:
        return {"intent": self.intent, "confidence": round(self.confidence, 4), "reason": self.reason,
                "slots": self.slots, "handlers": [f"{h.plugin}.{h.method}" for h in self.handlers],
                "scores": {k: round(v, 4) for k, v in sorted(self.scores.items(), key=lambda kv: -kv[1])}}


class _VectorCache:
    """Example embeddings by text; bounded, shared by all routers of the process."""

    def __init__(self, max_items: int = 20_000) -> None:
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_items

    def encode(self, texts: list[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._items]
        if missing:
            vectors = encode(missing)
            with self._lock:
                for text, vector in zip(missing, vectors):
                    self._items[text] = np.asarray(vector, dtype=np.float32)
                while len(self._items) > self._max:
                    self._items.popitem(last=False)
        with self._lock:
            return np.stack([self._items[t] for t in texts]) if texts else np.zeros((0, 1), np.float32)


_cache = _VectorCache()


def extract_slots(patterns: Iterable[re.Pattern], message: str) -> tuple[bool, dict[str, str]]:
    matched, slots = False, {}
    for pattern in patterns:
        m = pattern.search(message)
        if m:
            matched = True
            slots.update({k: v for k, v in m.groupdict().items() if v})
    return matched, slots


class IntentRouter:
    def __init__(self, intents: Iterable[IntentSpec], *, encode: Callable[[list[str]], np.ndarray],
                 threshold: float = 0.5, margin: float = 0.04, keyword_bonus: float = 0.15, top_k: int = 2,
                 none_examples: Iterable[str] = DEFAULT_NONE_EXAMPLES) -> None:
        self.threshold, self.margin, self.keyword_bonus, self.top_k = threshold, margin, keyword_bonus, top_k
        self._encode = encode
        self.handlers: dict[str, list[IntentSpec]] = {}
        examples: dict[str, list[str]] = {}
        self.patterns: dict[str, list[re.Pattern]] = {}
        for spec in intents:
            self.handlers.setdefault(spec.intent, []).append(spec)
            examples.setdefault(spec.intent, []).extend(e for e in spec.examples if e.strip())
            self.patterns.setdefault(spec.intent, []).extend(re.compile(k, re.I) for k in spec.keywords)
        for handlers in self.handlers.values():
            handlers.sort(key=lambda s: (-s.priority, s.plugin))
        none = [e for e in none_examples if e.strip()]
        # Anchors only matter against example-based intents; keyword-only routers never embed.
        if none and any(examples.values()):
            examples[NONE] = none
        self._example_free = {i for i in self.handlers if not examples.get(i)}
        self._labels: list[str] = []
        texts: list[str] = []
        for intent, items in examples.items():
            items = list(dict.fromkeys(items))
            texts.extend(items)
            self._labels.extend([intent] * len(items))
        self._texts = texts
        self._matrix: np.ndarray | None = None
        self._label_index = {label: np.array([i for i, lab in enumerate(self._labels) if lab == label])
                             for label in set(self._labels)}

    @property
    def intents(self) -> list[str]:
        return sorted(self.handlers)

    def _examples_matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = _cache.encode(self._texts, self._encode)
        return self._matrix

    def scores(self, message: str) -> dict[str, float]:
        if not self._texts:
            return {}
        query = np.asarray(self._encode([message])[0], dtype=np.float32)
        sims = self._examples_matrix() @ query
        out = {}
        for label, idx in self._label_index.items():
            best = np.sort(sims[idx])[::-1][: self.top_k]
            out[label] = float(best.mean())
        return out

    def route(self, message: str, *, allowed: Callable[[IntentSpec], bool] | None = None) -> RouteDecision:
        """The intent for `message`, or intent=None (plain RAG answers).

        `allowed` filters handlers (e.g. by the user's groups) after the decision, so a user who may
        not use the winning intent gets plain RAG rather than a weaker second choice.
        """
        message = (message or "").strip()
        if not self.handlers or not message:
            return RouteDecision(None, 0.0, reason="no_intents" if not self.handlers else "empty")
        scores = self.scores(message)
        slots: dict[str, str] = {}
        keyword_hits: set[str] = set()
        for intent, patterns in self.patterns.items():
            matched, found = extract_slots(patterns, message)
            if matched:
                keyword_hits.add(intent)
                # An intent with no examples is recognised by its patterns alone.
                bonus = 1.0 if intent in self._example_free else self.keyword_bonus
                scores[intent] = min(1.0, scores.get(intent, 0.0) + bonus)
                slots[intent] = found
        if not scores:
            return RouteDecision(None, 0.0, reason="below_threshold")
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        best_label, best = ranked[0]
        runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
        if best_label == NONE:
            return RouteDecision(None, 0.0, scores=scores, reason="none_closer")
        if best < self.threshold:
            return RouteDecision(None, 0.0, scores=scores, reason="below_threshold")
        if best - runner_up < self.margin and best_label not in keyword_hits:
            return RouteDecision(None, 0.0, scores=scores, reason="ambiguous")
        handlers = self.handlers[best_label]
        # Slots come from every pattern of the intent, even when the embedding decided.
        _, intent_slots = extract_slots(self.patterns.get(best_label, []), message)
        decision = RouteDecision(best_label, best, list(handlers), intent_slots, scores, "matched")
        if allowed is not None:
            decision.handlers = [h for h in handlers if allowed(h)]
        return decision


def evaluate(router: IntentRouter, labelled: dict[str, list[str]]) -> dict:
    """Accuracy on labelled utterances ({intent or "none": [...]}), precision/recall of "none", confusion."""
    confusion: dict[str, dict[str, int]] = {}
    mistakes = []
    correct = total = 0
    for expected, utterances in labelled.items():
        for text in utterances:
            got = router.route(text).intent or "none"
            confusion.setdefault(expected, {}).setdefault(got, 0)
            confusion[expected][got] += 1
            total += 1
            if got == expected:
                correct += 1
            else:
                mistakes.append({"utterance": text, "expected": expected, "got": got})
    predicted_none = sum(row.get("none", 0) for row in confusion.values())
    true_none = confusion.get("none", {}).get("none", 0)
    actual_none = sum(confusion.get("none", {}).values())
    in_scope = [k for k in labelled if k != "none"]
    in_correct = sum(confusion.get(k, {}).get(k, 0) for k in in_scope)
    in_total = sum(len(labelled[k]) for k in in_scope)
    return {
        "total": total, "accuracy": correct / total if total else 0.0,
        "in_scope_accuracy": in_correct / in_total if in_total else 0.0,
        "none_precision": true_none / predicted_none if predicted_none else 1.0,
        "none_recall": true_none / actual_none if actual_none else 1.0,
        "confusion": confusion, "mistakes": mistakes,
    }
