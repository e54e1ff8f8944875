#!/usr/bin/env bash
# Headless Chromium and its WebDriver from Debian's packages, for tests/e2e/test_mlflow_ui.py (the browser
# test of the MLflow UI; skipped without them). Safe to run again: installs only what is missing. Needs
# root (CI) or sudo. Selenium itself comes with the dev extra (pip), and uses /usr/bin/chromedriver: no
# driver is downloaded.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "install_browser: chromium and chromedriver already installed" >&2
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
$sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >&2
echo "install_browser: $(chromium --version 2>/dev/null), $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2)" >&2
