#!/usr/bin/env bash
# Installs what the test suite needs beyond Python packages: Debian's Chromium for
# the console's browser tests (Playwright's own browser download cannot work here).
# A failed install is not fatal for make dev: the tests that need it say what is missing.
set -uo pipefail
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser tests"
    (apt-get install -y -q chromium >/dev/null 2>&1) || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser tests will fail under MESH_TEST_REQUIRE_SERVICES=1 (CI) and skip otherwise" >&2
  else
    echo "note: /usr/bin/chromium is missing; install it (apt-get install chromium) for the console tests" >&2
  fi
fi
# promtool (Debian's prometheus package) checks deploy/observability's alerting rules.
if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "installing Debian's prometheus for promtool (alert rule checks)"
    (apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1) \
      || (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null) \
      || echo "warning: could not install prometheus; the alert rule checks will skip" >&2
  else
    echo "note: promtool is missing; install it (apt-get install prometheus) for the alert rule checks" >&2
  fi
fi
