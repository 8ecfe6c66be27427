"""The language mix of a text and the automatic model rule (rag/language.py), without Django."""
from __future__ import annotations

from apps.knowledge.rag.language import (
    MIN_TOKENS,
    MULTILINGUAL_SHARE,
    SWITCH_SHARE,
    LanguageMix,
    language_mix,
    multilingual_needed,
)

ZH = "员工每年享有十五天带薪年假。请假须提前三个工作日在系统中提交申请，并经直属主管批准。"
EN = "Employees are entitled to fifteen days of paid annual leave. Requests must be filed three working days ahead."


def test_one_token_per_cjk_character_and_per_word():
    zh = language_mix(ZH)
    assert zh.cjk == zh.tokens == sum(1 for c in ZH if "\u4e00" <= c <= "\u9fff")
    en = language_mix(EN)
    assert en.cjk == 0 and en.tokens == len(EN.replace(".", "").split())
    mixed = language_mix("请在 Settings > Security 页面启用 2FA（two-factor authentication）。")
    # Settings, Security, FA, two, factor, authentication + 6 characters; the digit is not a word
    assert (mixed.tokens, mixed.cjk) == (12, 6)
    assert language_mix("").tokens == 0 and language_mix("12 345, 6.7").tokens == 0
    # kana and hangul are CJK too; accented Latin words are words
    assert language_mix("ひらがな 한국어").cjk == 7 and language_mix("Café crème").tokens == 2


def test_mixes_add_up_and_report_their_share():
    total = language_mix(ZH) + language_mix(EN)
    assert total.tokens == language_mix(ZH).tokens + language_mix(EN).tokens
    assert 0 < total.cjk_share < 1 and total.to_dict()["cjk_tokens"] == total.cjk
    assert LanguageMix().cjk_share == 0.0


def test_per_token_a_half_chinese_base_reads_as_about_half_chinese():
    """The reason for tokens over letters: the same content in both languages counts about equally."""
    share = (language_mix(ZH) + language_mix(EN)).cjk_share
    letters = sum(1 for c in ZH + EN if c.isalpha())
    assert 0.4 < share < 0.8
    assert language_mix(ZH).cjk / letters < 0.4  # by letters it would look like a minority


def test_thresholds_with_hysteresis():
    assert MIN_TOKENS < 100 and MULTILINGUAL_SHARE < SWITCH_SHARE
    english_with_a_name = LanguageMix(tokens=1000, cjk=30)  # an English manual quoting a few Chinese names
    assert not multilingual_needed(english_with_a_name, embedded_with_english_model=False)
    some_chinese = LanguageMix(tokens=1000, cjk=150)
    # an undecided base takes the multilingual model; one already embedded with the English model waits
    assert multilingual_needed(some_chinese, embedded_with_english_model=False)
    assert not multilingual_needed(some_chinese, embedded_with_english_model=True)
    mostly_chinese = LanguageMix(tokens=1000, cjk=600)
    assert multilingual_needed(mostly_chinese, embedded_with_english_model=True)
    assert not multilingual_needed(LanguageMix(), embedded_with_english_model=False)
