"""The BM25 analyzer: Chinese segmentation, normalisation, identifiers, stopwords, user dictionary,
and that an index records it and refuses to be searched by another one."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from apps.knowledge.rag.analyzer import (
    ANALYZER_NAME,
    ANALYZER_VERSION,
    Analyzer,
    analyzer_from_spec,
    get_analyzer,
    parse_user_dictionary,
)
from apps.knowledge.rag.errors import IndexLoadError
from apps.knowledge.rag.index import BM25Index, IndexBundle, manifest_analyzer_matches, write_index_version

tokenize = get_analyzer().tokenize


def test_a_chinese_sentence_is_segmented_in_search_mode_not_one_token():
    tokens = tokenize("中华人民共和国的退货政策是什么")
    assert "退货" in tokens and "政策" in tokens
    assert {"中华人民共和国", "人民", "共和国"} <= set(tokens)  # the long word and its sub-words
    assert "中华人民共和国的退货政策是什么" not in tokens


def test_chinese_stopwords_and_question_words_are_dropped():
    tokens = tokenize("请问我的订单怎么退款呢？")
    assert "订单" in tokens and "退款" in tokens
    assert not {"请问", "我", "的", "怎么", "呢"} & set(tokens)


def test_traditional_and_simplified_and_full_width_give_the_same_tokens():
    assert tokenize("軟體退貨政策") == tokenize("软件退货政策")
    assert tokenize("ＡＰＩ　Ｋｅｙ１２３") == tokenize("API key123")
    assert tokenize("網路設定") == tokenize("网络设置") or tokenize("網路設定") == tokenize("网络设定")


def test_mixed_chinese_and_english_text():
    tokens = tokenize("如何在Docker容器中安装PostgreSQL数据库")
    assert {"docker", "容器", "安装", "postgresql", "数据库"} <= set(tokens)


def test_latin_words_are_stemmed_and_english_stopwords_dropped_as_before():
    assert tokenize("The Refunds are REFUNDED, refunding!") == ["refund", "refund", "refund"]
    assert tokenize("the and of a") == []
    assert tokenize("state-of-the-art") == ["state", "art"]


def test_english_question_words_are_dropped_like_the_chinese_ones():
    # "how do I ..." matched every chunk that says "how" or "you"; the question's content words remain
    assert tokenize("How do I reset my password, can you help?") == ["reset", "password", "help"]
    assert tokenize("怎么重置我的密码") == tokenize("重置密码")
    # words that are names or units once lower-cased stay: US, WHO, 9 am, May
    assert tokenize("US shipping, WHO guidance, opens 9 am in May") == ["us", "ship", "who", "guidanc", "open",
                                                                         "am", "may"]


@pytest.mark.parametrize("text, kept", [
    ("call __init__ first", "__init__"),
    ("compute 2*3*4 now", "2*3*4"),
    ("requires Python 3.11", "3.11"),
    ("upgrade to v1.2.3", "v1.2.3"),
    ("error E1234 occurred", "e1234"),
    ("use os.path.join here", "os.path.join"),
    ("written in C++", "c++"),
    ("set max_connections", "max_connections"),
])
def test_identifiers_and_numbers_are_kept_whole(text, kept):
    assert kept in tokenize(text)


def test_joined_identifiers_also_give_their_parts_underscore_ones_stay_whole():
    assert {"os.path.join", "os", "path", "join"} <= set(tokenize("os.path.join"))
    assert tokenize("__init__ and max_connections") == ["__init__", "max_connections"]


def test_user_dictionary_keeps_domain_terms_whole():
    plain = tokenize("我们的安心保障计划包括哪些内容")
    assert "安心保障计划" not in plain
    custom = get_analyzer(["安心保障计划", "Premium Care Plus", "微信支付V3"])
    tokens = custom.tokenize("我们的安心保障计划包括哪些内容，Premium  Care Plus和微信支付V3")
    assert "安心保障计划" in tokens
    assert "premium care plus" in tokens  # a Latin phrase becomes one extra token
    assert "微信支付v3" in tokens
    assert "premium care plus" not in custom.tokenize("a premium care plush toy")


def test_user_dictionary_parsing_and_identity():
    terms = parse_user_dictionary("# products\n安心保障计划\n\n  Premium   Care Plus \nPREMIUM CARE PLUS\n")
    assert terms == ("安心保障计划", "premium care plus")
    a, b = get_analyzer(terms), get_analyzer(reversed(terms))
    assert a.dictionary_hash == b.dictionary_hash != get_analyzer().dictionary_hash
    assert get_analyzer(terms) is a  # one shared analyzer (and jieba tokenizer) per dictionary
    spec = a.spec
    assert spec["name"] == ANALYZER_NAME and spec["version"] == ANALYZER_VERSION
    assert analyzer_from_spec(spec) is a
    assert analyzer_from_spec({**spec, "version": ANALYZER_VERSION + 1}) is None
    assert analyzer_from_spec({"name": "other", "version": 1}) is None


def test_a_user_dictionary_does_not_change_the_default_segmenter():
    before = tokenize("我们的安心保障计划")
    Analyzer(["安心保障计划"]).tokenize("安心保障计划")
    assert tokenize("我们的安心保障计划") == before


def test_jieba_loads_quietly():
    code = ("from apps.knowledge.rag.analyzer import get_analyzer; "
            "print(get_analyzer().tokenize('结巴中文分词'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parents[3]))
    assert result.returncode == 0, result.stderr
    assert "结巴" in result.stdout
    assert result.stderr.strip() == ""


def test_chinese_bm25_finds_the_passage():
    texts = ["退货政策：商品签收后七天内可以申请无理由退货。", "配送时间：订单一般在两个工作日内发货。",
             "Support hours are 9am to 5pm."]
    bm25 = BM25Index([1, 2, 3], texts)
    assert bm25.search("签收以后多久能退貨？", 3)[0][0] == 1
    assert bm25.search("什么时候发货", 3)[0][0] == 2


def test_the_index_records_the_analyzer_and_queries_use_its_dictionary(tmp_path):
    custom = get_analyzer(["安心保障计划"])
    texts = ["安心保障计划包括免费上门维修。", "普通保修只包括换货。"]
    path = write_index_version(tmp_path, 1, ids=[1, 2], vectors=np.eye(2, dtype=np.float32), texts=texts,
                               meta={"model_id": "m"}, analyzer=custom)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["analyzer"] == {"name": ANALYZER_NAME, "version": ANALYZER_VERSION}
    assert manifest["user_dictionary_sha256"] == custom.dictionary_hash
    assert manifest_analyzer_matches(manifest, custom)
    assert not manifest_analyzer_matches(manifest, get_analyzer())
    bundle = IndexBundle.load(path)
    assert bundle.analyzer_current and bundle.bm25.analyzer is custom
    assert bundle.bm25_search("安心保障计划", 2)[0][0] == 1


def test_an_index_built_by_another_analyzer_is_not_searched(tmp_path):
    path = write_index_version(tmp_path, 1, ids=[1], vectors=np.eye(1, dtype=np.float32), texts=["refund policy"],
                               meta={"model_id": "m"})
    meta_path = _bm25_meta(path)
    meta = json.loads(meta_path.read_text())
    meta["analyzer"]["version"] = ANALYZER_VERSION - 1
    meta_path.write_text(json.dumps(meta))
    bundle = IndexBundle.load(path)
    assert not bundle.analyzer_current
    assert bundle.bm25_search("refund", 1) == []
    assert bundle.dense_search(np.ones(1, dtype=np.float32), 1)[0][0] == 1  # dense still serves


def _bm25_meta(version_path):
    """bm25.json of a one-segment version (segments live beside the versions, shared between them)."""
    manifest = json.loads((version_path / "manifest.json").read_text())
    return version_path.parent / "segments" / manifest["segments"][0]["name"] / "bm25.json"


def test_a_legacy_english_only_index_is_refused_so_it_gets_rebuilt(tmp_path):
    """Versions written before segments and the analyzer (manifest format 1, bm25s files) are not loaded:
    the registry asks for a rebuild, which writes every chunk anew."""
    path = tmp_path / "v000001"
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"format": 1, "version": 1, "count": 1, "dim": 1}))
    (path / "bm25.json").write_text(json.dumps({"kind": "bm25s-lucene-k1.5-b0.75-en-stopwords-snowball",
                                                "count": 1}))
    with pytest.raises(IndexLoadError, match="unsupported manifest format"):
        IndexBundle.load(path)
