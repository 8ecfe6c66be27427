"""The interface in English and Chinese: complete catalogs, compiled files in sync, the language chosen
from the user's switch (a cookie), else Accept-Language, else English; the same for API errors,
websocket frames, the admin pages and command output."""
from __future__ import annotations

import ast
import gettext as gettext_module
import json
import re
import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import translation

ROOT = Path(settings.BASE_DIR)
LOCALE = ROOT / "locale"
DOMAINS = ("django", "djangojs")
ZH = "zh_Hans"


def parse_po(path: Path) -> list[dict]:
    """Entries of a .po file: msgid, msgid_plural, msgstr {index: text}, flags. Obsolete (#~) entries are skipped."""
    entries, cur, last = [], None, None

    def flush():
        if cur is not None and cur["msgid"] is not None:
            entries.append(cur)

    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            flush()
            cur, last = None, None
            continue
        if cur is None:
            cur = {"msgid": None, "msgid_plural": None, "msgctxt": None, "msgstr": {}, "flags": set()}
        if line.startswith("#,"):
            cur["flags"] |= {f.strip() for f in line[2:].split(",")}
        elif line.startswith("#"):
            continue
        elif line.startswith('"'):
            text = ast.literal_eval(line)
            if last[0] == "msgstr":
                cur["msgstr"][last[1]] += text
            else:
                cur[last[0]] += text
        else:
            m = re.match(r'(msgctxt|msgid_plural|msgid|msgstr)(?:\[(\d+)\])? (".*")$', line)
            assert m, f"{path}: cannot read {line!r}"
            key, index, text = m.group(1), m.group(2), ast.literal_eval(m.group(3))
            if key == "msgstr":
                cur["msgstr"][int(index or 0)] = text
                last = ("msgstr", int(index or 0))
            else:
                cur[key] = text
                last = (key, None)
    return entries


def catalog(domain: str) -> list[dict]:
    return [e for e in parse_po(LOCALE / ZH / "LC_MESSAGES" / f"{domain}.po") if e["msgid"]]


_PY_PLACEHOLDER = re.compile(r"%\((\w+)\)[sdrf]|%[sdrf]")
_TAG = re.compile(r"</?(?:a|b|br|code|em|i|li|p|span|strong|table|td|th|tr|ul)\b")


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_message_is_translated_and_none_is_fuzzy(domain):
    entries = catalog(domain)
    assert len(entries) > (100 if domain == "django" else 10)
    untranslated = [e["msgid"] for e in entries if not all(e["msgstr"].values()) or not e["msgstr"]]
    fuzzy = [e["msgid"] for e in entries if "fuzzy" in e["flags"]]
    assert untranslated == [], f"untranslated in {domain}.po (run makemessages, translate, compilemessages)"
    assert fuzzy == [], f"fuzzy entries in {domain}.po: check and translate them"


@pytest.mark.parametrize("domain", DOMAINS)
def test_translations_keep_their_placeholders(domain):
    for e in catalog(domain):
        for text in e["msgstr"].values():
            if "python-format" in e["flags"] or "javascript-format" in e["flags"]:
                source = e["msgid_plural"] or e["msgid"]
                assert sorted(_PY_PLACEHOLDER.findall(text)) == sorted(_PY_PLACEHOLDER.findall(source)), e["msgid"]
            assert text.count("{}") == e["msgid"].count("{}"), e["msgid"]  # format_html templates
            assert _TAG.findall(text) == _TAG.findall(e["msgid"]), e["msgid"]  # same markup, in order


@pytest.mark.parametrize("domain", DOMAINS)
def test_compiled_catalogs_match_the_po_files(domain):
    """The .mo files are committed (no gettext needed to install); they must say what the .po files say."""
    mo = LOCALE / ZH / "LC_MESSAGES" / f"{domain}.mo"
    assert mo.is_file(), "run: KOTAEMON_DEMO=1 .venv/bin/python manage.py compilemessages -l zh_Hans"
    with mo.open("rb") as fh:
        compiled = gettext_module.GNUTranslations(fh)._catalog
    expected = {}
    for e in catalog(domain):
        key = e["msgid"] if e["msgctxt"] is None else f"{e['msgctxt']}\x04{e['msgid']}"
        if e["msgid_plural"] is None:
            expected[key] = e["msgstr"][0]
        else:
            for index, text in e["msgstr"].items():
                expected[(key, index)] = text
    compiled = {k: v for k, v in compiled.items() if k != ""}
    assert compiled == expected, "the .mo files are stale: run compilemessages and commit them"


@pytest.mark.skipif(shutil.which("xgettext") is None, reason="GNU gettext (xgettext) is not installed")
def test_every_string_marked_in_the_code_is_in_the_catalogs(tmp_path):
    """makemessages over a copy of the tree finds no msgid the committed catalogs lack (a new string
    wrapped in gettext but never translated fails here)."""
    for name in ("apps", "templates", "kotaemon_site", "locale"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.mo"))
    shutil.copy(ROOT / "manage.py", tmp_path / "manage.py")
    env = {"PATH": "/usr/bin:/bin", "KOTAEMON_DEMO": "1", "KOTAEMON_DATA_DIR": str(tmp_path / "var"),
           "HOME": str(tmp_path)}
    for domain in DOMAINS:
        subprocess.run([sys.executable, "manage.py", "makemessages", "-d", domain, "-l", ZH, "--no-location",
                        "--no-obsolete", "--ignore=var"], cwd=tmp_path, env=env, check=True, capture_output=True)
        fresh = {e["msgid"] for e in parse_po(tmp_path / "locale" / ZH / "LC_MESSAGES" / f"{domain}.po") if e["msgid"]}
        committed = {e["msgid"] for e in catalog(domain)}
        assert sorted(fresh - committed) == [], f"new strings missing from {domain}.po"
        assert sorted(committed - fresh) == [], f"{domain}.po holds strings no code uses any more"


# --- choosing the language ---------------------------------------------------------------------

@pytest.mark.django_db
def test_chat_page_follows_accept_language_and_defaults_to_english(client, user):
    client.force_login(user)
    english = client.get("/").content.decode()
    assert '<html lang="en">' in english and "New chat" in english and "Ask a question…" in english
    chinese = client.get("/", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"})
    html = chinese.content.decode()
    assert chinese["Content-Language"] == "zh-hans"
    assert '<html lang="zh-hans">' in html
    assert "新对话" in html and "请输入问题…" in html and "发送" in html and "New chat" not in html
    # Traditional-script and other Chinese variants are not supported: English, not a guess.
    assert "New chat" in client.get("/", headers={"Accept-Language": "fr-FR"}).content.decode()


@pytest.mark.django_db
def test_language_switch_is_remembered_in_a_cookie_over_accept_language(client, user):
    client.force_login(user)
    resp = client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/?c=abc"})
    assert resp.status_code == 302 and resp["Location"] == "/?c=abc"
    cookie = resp.cookies[settings.LANGUAGE_COOKIE_NAME]
    assert cookie.value == "zh-hans" and int(cookie["max-age"]) >= 30 * 24 * 3600
    # The choice wins over the browser's header, on every later page.
    assert "新对话" in client.get("/", headers={"Accept-Language": "en-US"}).content.decode()
    client.post("/i18n/setlang/", {"language": "en", "next": "/"})
    assert "New chat" in client.get("/", headers={"Accept-Language": "zh-CN"}).content.decode()
    # An unsupported choice changes nothing.
    client.post("/i18n/setlang/", {"language": "xx", "next": "/"})
    assert "New chat" in client.get("/").content.decode()


@pytest.mark.django_db
def test_page_offers_the_switch_and_loads_the_javascript_catalog(client, user):
    client.force_login(user)
    html = client.get("/", headers={"Accept-Language": "zh-CN"}).content.decode()
    assert 'id="language-select"' in html and "简体中文" in html and "English" in html
    assert '<option value="zh-hans" selected' in html
    assert html.index('src="/jsi18n/"') < html.index("conversations/chat.js")
    js = client.get("/jsi18n/", headers={"Accept-Language": "zh-CN"}).content.decode()
    assert "\\u91cd\\u547d\\u540d" in js or "重命名" in js  # "Rename"
    assert "Rename" in client.get("/jsi18n/").content.decode() or "catalog" in client.get("/jsi18n/").content.decode()


@pytest.mark.django_db
def test_login_page_in_chinese(client):
    html = client.get("/accounts/login/", headers={"Accept-Language": "zh-CN"}).content.decode()
    assert "登录 kotaemon-site" in html and "用户名" in html and "密码" in html


# --- API errors: the message is translated, the code is not ----------------------------------

@pytest.mark.django_db
def test_api_error_messages_follow_the_language_and_codes_stay(auth_client):
    english = auth_client.post("/api/v1/chat/", {"message": "  "}, format="json")
    chinese = auth_client.post("/api/v1/chat/", {"message": "  "}, format="json", HTTP_ACCEPT_LANGUAGE="zh-CN")
    assert english.status_code == chinese.status_code == 400
    assert english.json()["error"]["code"] == chinese.json()["error"]["code"] == "validation_error"
    assert english.json()["error"]["message"] == "The request is invalid; see details."
    assert chinese.json()["error"]["message"] == "请求无效，详见 details。"
    bad = auth_client.get("/api/v1/conversations/?archived=maybe", HTTP_ACCEPT_LANGUAGE="zh-CN").json()["error"]
    assert bad["message"] == "archived 的取值只能是 false、true 或 all。"
    missing = auth_client.get("/api/v1/conversations/no-such-conv-1/", HTTP_ACCEPT_LANGUAGE="zh-CN").json()
    assert missing["error"]["code"] == "conversation_not_found" and missing["error"]["message"] == "对话不存在。"
    unknown = auth_client.get("/api/v1/nothing-here/", HTTP_ACCEPT_LANGUAGE="zh-CN").json()
    assert unknown["error"] == {"code": "not_found", "message": "接口或对象不存在。", "details": {}}


@pytest.mark.django_db
def test_interpolated_messages_are_translated_with_their_values(auth_client):
    resp = auth_client.post("/api/v1/chat/", {"message": "x" * 8001}, format="json", HTTP_ACCEPT_LANGUAGE="zh")
    error = resp.json()["error"]
    assert error["code"] == "message_too_long" and error["message"] == "消息最多 8000 个字符。"
    assert error["details"]["max_chars"] == 8000


@pytest.mark.django_db(transaction=True)
async def test_websocket_frames_follow_the_cookie_then_accept_language(user):
    import asyncio

    from channels.testing import WebsocketCommunicator

    from apps.core.services import api_key_create
    from kotaemon_site.asgi import application

    issued = await asyncio.to_thread(api_key_create, user=user)
    base = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"),
            (b"authorization", f"Bearer {issued.raw_key}".encode())]

    async def error_for(extra):
        comm = WebsocketCommunicator(application, "/ws/chat/i18n-session-01/", headers=base + extra)
        connected, _ = await comm.connect()
        assert connected
        await comm.send_to(text_data="{not json")
        frame = json.loads(await comm.receive_from(timeout=10))
        await comm.send_to(text_data=json.dumps({"type": "message", "message": ""}))
        turn = json.loads(await comm.receive_from(timeout=30))
        await comm.disconnect()
        return frame, turn

    frame, turn = await error_for([(b"accept-language", b"zh-CN,zh;q=0.9")])
    assert frame["code"] == "malformed_json" and frame["message"] == "该帧不是有效的 JSON。"
    assert turn["code"] == "message_required" and turn["message"] == "请发送非空消息。"  # from the turn's thread
    cookie = f"{settings.LANGUAGE_COOKIE_NAME}=en".encode()
    frame, turn = await error_for([(b"accept-language", b"zh-CN"), (b"cookie", cookie)])
    assert frame["message"] == "The frame is not valid JSON." and turn["message"] == "Send a non-empty message."
    frame, _ = await error_for([(b"cookie", f"csrftoken=x; {settings.LANGUAGE_COOKIE_NAME}=zh-hans".encode())])
    assert frame["message"] == "该帧不是有效的 JSON。"
    frame, _ = await error_for([])
    assert frame["message"] == "The frame is not valid JSON."


def test_language_from_scope_reads_cookie_then_header():
    from apps.core.i18n import language_from_scope

    def scope(**headers):
        return {"headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}

    assert language_from_scope(scope()) == "en"
    assert language_from_scope(scope(accept_language="zh-CN,zh;q=0.9")) == "zh-hans"
    assert language_from_scope(scope(accept_language="zh")) == "zh-hans"
    assert language_from_scope(scope(accept_language="de, zh-SG;q=0.5")) == "zh-hans"
    assert language_from_scope(scope(accept_language="de")) == "en"
    assert language_from_scope(scope(accept_language="zh", cookie=f"{settings.LANGUAGE_COOKIE_NAME}=en")) == "en"
    assert language_from_scope(scope(cookie=f"{settings.LANGUAGE_COOKIE_NAME}=klingon")) == "en"
    assert language_from_scope(scope(cookie="\x00garbage;;=", accept_language="zh-CN")) == "zh-hans"


# --- admin customisations ----------------------------------------------------------------------

@pytest.fixture
def admin_client_zh(client, django_user_model):
    admin = django_user_model.objects.create_superuser(username="root", password="pw-root-123")
    client.force_login(admin)
    client.cookies[settings.LANGUAGE_COOKIE_NAME] = "zh-hans"
    return client


@pytest.mark.django_db
def test_admin_pages_in_chinese(admin_client_zh, user):
    from apps.knowledge.models import KnowledgeBase

    kb = KnowledgeBase.objects.create(name="手册", slug="handbook", owner=user)
    index = admin_client_zh.get("/admin/").content.decode()
    assert "运维" in index and "仪表盘" in index and "集群" in index
    dashboard = admin_client_zh.get("/admin/dashboard/").content.decode()
    assert "运维仪表盘" in dashboard and "每日回答数" in dashboard and "未解答的问题" in dashboard
    assert "Answers per day" not in dashboard
    cluster = admin_client_zh.get("/admin/cluster/").content.decode()
    assert "心跳时长（秒）" in cluster
    kb_list = admin_client_zh.get("/admin/knowledge/knowledgebase/").content.decode()
    assert "当前索引" in kb_list and "重建所选知识库的索引" in kb_list
    change = admin_client_zh.get(f"/admin/knowledge/knowledgebase/{kb.pk}/change/").content.decode()
    assert "检索测试" in change and "重建索引" in change and "上传文件" in change
    retrieval = admin_client_zh.get(f"/admin/knowledge/knowledgebase/{kb.pk}/test-retrieval/").content.decode()
    assert "此知识库还没有可用的索引。" in retrieval
    upload = admin_client_zh.get("/admin/knowledge/document/upload/").content.decode()
    assert "选择一个知识库" in upload
    plugins = admin_client_zh.get("/admin/plugins/pluginconfig/").content.decode()
    assert "重新加载插件" in plugins and "调用统计" in plugins
    audit = admin_client_zh.get("/admin/monitoring/auditevent/").content.decode()
    assert "导出 CSV（当前筛选条件）" in audit


@pytest.mark.django_db
def test_admin_messages_in_chinese(admin_client_zh, user):
    from apps.knowledge.models import KnowledgeBase

    kb = KnowledgeBase.objects.create(name="Handbook", slug="handbook", owner=user)
    resp = admin_client_zh.post(f"/admin/knowledge/knowledgebase/{kb.pk}/rebuild/", follow=True)
    assert "已排队重建“Handbook”的索引。" in resp.content.decode()


# --- commands ------------------------------------------------------------------------------------

def test_command_language_comes_from_the_environment():
    from apps.core.i18n import command_language

    assert command_language({}) is None
    assert command_language({"KOTAEMON_COMMAND_LANGUAGE": "auto", "LANG": "C.UTF-8"}) is None
    assert command_language({"KOTAEMON_COMMAND_LANGUAGE": "auto", "LANG": "zh_CN.UTF-8"}) == "zh-hans"
    assert command_language({"KOTAEMON_COMMAND_LANGUAGE": "auto", "LANGUAGE": "zh_CN:en", "LANG": "en_US.UTF-8"}) \
        == "zh-hans"
    assert command_language({"KOTAEMON_COMMAND_LANGUAGE": "auto", "LC_ALL": "en_GB.UTF-8", "LANG": "zh_CN"}) == "en"
    assert command_language({"KOTAEMON_COMMAND_LANGUAGE": "zh-hans", "LANG": "en_US.UTF-8"}) == "zh-hans"


@pytest.mark.django_db
def test_command_output_in_chinese(user):
    from django.core.management.base import CommandError

    out, err = StringIO(), StringIO()
    with translation.override("zh-hans"):
        call_command("create_api_key", "alice", "--name", "cli", stdout=out, stderr=err)
        assert "密钥只显示这一次" in err.getvalue()
        with pytest.raises(CommandError, match="没有名为 'nobody' 的用户。"):
            call_command("create_api_key", "nobody")
    with translation.override("en"), pytest.raises(CommandError, match="No user named 'nobody'."):
        call_command("create_api_key", "nobody")


@pytest.mark.slow
def test_manage_py_speaks_the_operators_locale(tmp_path):
    base = {"PATH": "/usr/bin:/bin", "KOTAEMON_DEMO": "1", "KOTAEMON_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)}
    for lang, expected in (("zh_CN.UTF-8", "请给出类似 90d、12h、2w、30m 或 45s 的时长"), ("C.UTF-8", "Give an age like 90d")):
        proc = subprocess.run([sys.executable, "manage.py", "archive_conversations", "--older-than", "soon"], cwd=ROOT,
                              env={**base, "LANG": lang}, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-500:]
