"""Looking at runs as a user does (issue 16): a tiny sweep, then the MLflow UI in a real browser and
optuna-dashboard on its study.

The browser tests drive Debian's headless ``chromium`` through its ``chromedriver`` with Selenium
(scripts/install_browser.sh installs both; no driver is downloaded) and skip where they are missing. They
start ``mlflow ui`` on the sweep's store and check what a user sees: the experiment opens on its training
runs (not MLflow 3's GenAI overview), the sweep's parent run holds its trial runs, the Dataset column is
filled, a run page shows its data splits, its chart sections and the learning curves, the System
metrics tab has charts, the compare view of two trials lists their parameter differences, and
optuna-dashboard shows each trial with its MLflow run. Each step saves a screenshot into
$BLOODCELL_SCREENSHOTS (default outputs/ui_screenshots/); docs/img/ keeps the ones the README shows.

Everything runs on one module-scoped sweep (a few minutes on 2 CPU cores); `mlflow ui` and the dashboard
start once, in their own process groups, and end with the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.helpers import REPO, TINY, assert_ok, free_port, run_module, sqlite_store

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = Path(os.environ.get("BLOODCELL_SCREENSHOTS") or REPO / "outputs" / "ui_screenshots")
WINDOW = (1400, 900)
#: what the README tells users to type into a run's "Search metric charts" box (a regular expression)
CURVES_SEARCH = "^(train|val)_|^learning_rate"

# Two trials of the quick study, two epochs in phase 1 so that every run has curves (not single points);
# system metrics every second, so that even a run this short has a few samples.
TRIAL = [o for o in TINY if o not in ("+experiment=quickstart", "trainer.epochs=1")] + [
    "trainer.epochs=2",
    "tracking.log_model=false",
    "tracking.system_metrics_seconds=1",
]

pytestmark = pytest.mark.slow


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as err:  # not up yet, element not there yet
            last = err
        else:
            last = None
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}" + (f" ({last})" if last else ""))
        time.sleep(every)


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> SimpleNamespace:
    """A finished two-trial sweep: its MLflow store and Optuna storage."""
    tmp = tmp_path_factory.mktemp("sweep")
    store = sqlite_store(tmp / "mlflow.db")
    storage = f"sqlite:///{tmp / 'optuna.db'}"
    assert_ok(
        run_module(
            "bloodcell.train",
            "-m",
            "+sweeps=quick",
            *TRIAL,
            "hydra.sweeper.n_trials=2",
            # both trials train both phases, as runs whose records these tests read (sweeps/quick.yaml
            # searches phase 2 only, so the second would otherwise reuse the first one's phase 1 and be
            # over before MLflow's first system-metrics sample; reuse has its own tests in test_sweep.py)
            "trainer.reuse_phase1=false",
            f"tracking.uri={store}",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweep.dir={tmp / 'multirun'}",
            timeout=900,
        )
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("bloodcell.sweep") == "true"]
    trials = sorted(
        (r for r in runs if "trial_number" in r.data.tags), key=lambda r: r.data.tags["trial_number"]
    )
    assert len(trials) == 2
    return SimpleNamespace(
        dir=tmp,
        store=store,
        storage=storage,
        client=client,
        experiment=experiment,
        parent=parent,
        trials=trials,
    )


# ---------------------------------------------------------------------------------------- both ways
def test_each_trial_links_its_mlflow_run_and_each_run_names_its_study_and_trial(sweep):
    import optuna

    from bloodcell.sweep.trial import open_storage

    study = optuna.load_study(study_name="quick", storage=open_storage(sweep.storage))
    runs = {r.info.run_id: r for r in sweep.trials}
    for trial in study.trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna_study"] == "quick"
        assert run.data.tags["trial_number"] == str(trial.number)
        url = trial.user_attrs["mlflow_run_url"]
        assert url.endswith(
            f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
        )


def test_the_experiment_is_a_model_training_experiment_and_runs_record_their_data(sweep):
    assert sweep.experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for run in sweep.trials:
        inputs = run.inputs.dataset_inputs
        contexts = {i.tags[0].value: i.dataset for i in inputs}
        assert sorted(contexts) == ["test", "train", "val"]
        assert {d.name for d in contexts.values()} == {"demo"}
        profiles = {c: json.loads(d.profile) for c, d in contexts.items()}
        assert sum(p["images"] for p in profiles.values()) == 96  # data.per_class=12, 8 classes
        assert all(p["data_fingerprint"] == run.data.tags["data_fingerprint"] for p in profiles.values())
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
        history = sweep.client.get_metric_history(run.info.run_id, "time/train_images_per_second")
        assert len(history) >= 2 and all(m.value > 0 for m in history)


@pytest.fixture(scope="module")
def dashboard(sweep) -> Iterator[SimpleNamespace]:
    """`python -m bloodcell.dashboard` on the sweep's storage: its base URL and the study's id there."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bloodcell.dashboard", f"storage={sweep.storage}", f"port={port}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        studies = wait_for(lambda: json.loads(http_get(f"{base}/api/studies")), 120, "the dashboard")
        (study,) = [s for s in studies["study_summaries"] if s["study_name"] == "quick"]
        yield SimpleNamespace(base=base, study_id=study["study_id"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_dashboard_serves_the_study_with_its_mlflow_links(sweep, dashboard):
    trials = json.loads(http_get(f"{dashboard.base}/api/studies/{dashboard.study_id}?after=0"))["trials"]
    links = [{a["key"]: a["value"] for a in t["user_attrs"]}.get("mlflow_run_id") for t in trials]
    assert sorted(links) == sorted(r.info.run_id for r in sweep.trials)
    assert http_get(f"{dashboard.base}/dashboard").lstrip().lower().startswith("<!doctype html")


# ---------------------------------------------------------------------------------------- the browser
needs_browser = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="no chromium/chromedriver (bash scripts/install_browser.sh installs them)",
)


@pytest.fixture(scope="module")
def mlflow_ui(sweep) -> Iterator[str]:
    """`mlflow ui` on the sweep's store, as the README says to start it; its base URL. One worker and no
    job runner (MLflow's GenAI scoring jobs): the pages are the same, the server a tenth of the processes."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", sweep.store, "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--workers", "1"],
        cwd=sweep.dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the server's worker processes end with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(f"{base}/health") == "OK", 180, "mlflow ui to start")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Browser:
    """Headless Chromium on the MLflow UI (a React app: everything is waited for by its text)."""

    def __init__(self, base: str) -> None:
        from selenium import webdriver

        self.base = base
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):  # fmt: skip
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

    def open(self, url: str, *texts: str, timeout: float = 120) -> str:
        self.driver.get(url)
        return self.wait_text(*texts, timeout=timeout)

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait_text(self, *texts: str, timeout: float = 120) -> str:
        return wait_for(lambda: all(t in (page := self.text()) for t in texts) and page, timeout, f"{texts}")

    def element(self, xpath: str, timeout: float = 60) -> Any:
        from selenium.webdriver.common.by import By

        return wait_for(lambda: self.driver.find_element(By.XPATH, xpath), timeout, xpath)

    def row(self, run_name: str) -> Any:
        """The runs table's row of a run (its part with the name and check box; the grid draws the pinned
        columns and the others as separate rows with the same row-id)."""
        return self.element(f"//*[text()='{run_name}']/ancestor::*[@role='row'][1]")

    def row_text(self, run_name: str) -> str:
        row_id = self.row(run_name).get_attribute("row-id")
        return " ".join(r.text for r in self.driver.find_elements("css selector", f"[row-id='{row_id}']"))

    def click(self, element: Any) -> None:
        # through JavaScript: MLflow's pop-overs may lie over an element a user would click all the same
        self.driver.execute_script("arguments[0].click()", element)

    def scroll_to(self, xpath: str) -> None:
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", self.element(xpath))
        time.sleep(1)

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.close_assistant()
        time.sleep(1.5)  # charts animate in
        path = SCREENSHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def quiet_assistant(self) -> None:
        """MLflow 3.17 opens its chat assistant over a third of the page on a browser's first visit: closed,
        as the first click on its X would leave it (the browser remembers that)."""
        self.driver.get(f"{self.base}/health")
        self.driver.execute_script(
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        )

    def remember_model_training(self) -> None:
        """What clicking MLflow's "Model training" switch leaves in the browser: every page opens on the
        model-training side, links without ``?workflowType=`` too."""
        self.driver.get(f"{self.base}/health")  # off the app: it reads the setting when it loads
        self.driver.execute_script("localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');")

    def close_assistant(self) -> None:
        """The assistant's panel closed where a page opened it all the same (a run page may)."""
        for button in self.driver.find_elements("css selector", "[data-component-id$='chat_panel.close']"):
            if button.is_displayed():
                self.click(button)
                time.sleep(0.5)


@pytest.fixture(scope="module")
def browser(mlflow_ui) -> Iterator[Browser]:
    pytest.importorskip("selenium")
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("no chromium/chromedriver (bash scripts/install_browser.sh installs them)")
    browser = Browser(mlflow_ui)
    try:
        browser.quiet_assistant()
        yield browser
    finally:
        browser.driver.quit()


def page(base: str, path: str) -> str:
    from bloodcell.tracking import UI_QUERY

    return f"{base}/#/{path}{UI_QUERY}"


@needs_browser
def test_the_link_bloodcell_prints_opens_the_experiment_on_its_training_runs(sweep, mlflow_ui, browser):
    from bloodcell.tracking import ui_url

    browser.open(ui_url(sweep.experiment.experiment_id, tracking_uri=mlflow_ui), "sweep-quick", "Dataset")
    text = browser.text()
    assert "/runs" in browser.driver.current_url
    for genai in ("Detect Issues", "Token Usage", "Judges"):  # MLflow 3's GenAI overview
        assert genai not in text
    # the sweep's parent run, opened: its two trial runs nested under it, each with its data splits
    browser.click(
        browser.row("sweep-quick").find_element("css selector", "button[data-component-id*='runname']")
    )
    browser.wait_text("quick-trial-0", "quick-trial-1")
    for trial in ("quick-trial-0", "quick-trial-1"):
        assert "demo (" in browser.row_text(trial)  # the Dataset column: name (digest)
    browser.shot("mlflow_experiment_runs")


@needs_browser
def test_a_trial_run_page_shows_its_data_its_chart_sections_and_the_learning_curves(
    sweep, mlflow_ui, browser
):
    run = sweep.trials[0].info
    runs = f"experiments/{run.experiment_id}/runs/{run.run_id}"
    browser.open(page(mlflow_ui, runs), "quick-trial-0", "Datasets", "demo (")
    browser.shot("mlflow_run_overview")
    # its data: the three splits, each with its digest, image count and class counts (the profile)
    browser.click(browser.element("//span[starts-with(normalize-space(.), 'demo (')]"))
    text = browser.wait_text("3 datasets used", "Val", "Test", "images:", "classes:", "basophil")
    assert sweep.trials[0].data.tags["data_fingerprint"][:40] in text
    browser.shot("mlflow_run_datasets")

    # MLflow groups the charts by the name before "/", sorts those sections by name and puts the metrics
    # without one, the learning curves among them, last in "Model metrics"
    text = browser.open(page(mlflow_ui, f"{runs}/model-metrics"), "per_class", "time", "Model metrics")
    sections = [text.index("per_class"), text.index("time"), text.rindex("Model metrics")]  # (tab first)
    assert sections == sorted(sections), text[:3000]
    # the README's search: only the learning curves, drawn (Plotly's line traces hold a path per curve)
    search = browser.element("//input[@placeholder='Search metric charts']")
    search.send_keys(CURVES_SEARCH)
    curves = ("learning_rate", "train_accuracy", "train_loss", "val_accuracy", "val_loss")
    for curve in curves:
        browser.element(f"//*[normalize-space(text())='{curve}']")
    wait_for(
        lambda: (
            len(
                [
                    p
                    for p in browser.driver.find_elements("css selector", "path.js-line")
                    if p.get_attribute("d")
                ]
            )
            >= len(curves)
        ),
        60,
        "the five learning curves drawn",
    )
    assert "per_class" not in browser.text() and "test_precision" not in browser.text()
    browser.shot("mlflow_run_learning_curves")

    browser.open(page(mlflow_ui, f"{runs}/system-metrics"), "cpu_utilization_percentage")
    browser.shot("mlflow_run_system_metrics")


@needs_browser
def test_the_compare_view_of_two_trials_lists_their_parameter_differences(sweep, mlflow_ui, browser):
    browser.remember_model_training()  # as one click on "Model training" would: the compare page keeps it
    browser.open(page(mlflow_ui, f"experiments/{sweep.experiment.experiment_id}"), "sweep-quick")
    if "quick-trial-0" not in browser.text():  # the table remembers an opened parent run
        browser.click(
            browser.row("sweep-quick").find_element("css selector", "button[data-component-id*='runname']")
        )
    for trial in ("quick-trial-0", "quick-trial-1"):
        browser.click(browser.row(trial).find_element("css selector", "input.ag-checkbox-input"))
    compare = browser.element("//button[normalize-space(.)='Compare']")
    browser.click(compare)
    browser.wait_text("Comparing 2 Runs", "Parameters")
    assert "compare-runs" in browser.driver.current_url
    assert "backbone.name" in browser.text()  # every parameter, the same ones too
    browser.click(browser.element("//button[@aria-label='Parameters - Show diff only']"))
    wait_for(lambda: "backbone.name" not in browser.text(), 30, "the same parameters hidden")
    text = browser.text()
    for searched in ("finetune.lr", "finetune.augmentation_strength"):  # the study's search space
        assert searched in text
    browser.scroll_to("(//*[normalize-space(text())='Run details'])[last()]")
    browser.shot("mlflow_compare_trials")


@needs_browser
def test_the_dashboard_shows_each_trial_with_its_mlflow_run(sweep, dashboard, browser):
    browser.open(
        f"{dashboard.base}/dashboard/studies/{dashboard.study_id}/trials", "Trial 0", "User Attributes"
    )
    text = browser.wait_text("mlflow_run_id", "mlflow_run_url")
    assert sweep.trials[0].info.run_id in text and "workflowType=machine_learning" in text
    browser.shot("optuna_dashboard_trial")
