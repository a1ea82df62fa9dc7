"""The Ray dashboard shows what users submit: a tiny SFT job submitted to the session's local Ray through the
Jobs API (as ``ray job submit`` does, with a working directory and a runtime environment) appears in the
dashboard's Jobs page with its status, and its page lists the Ray Train run it started (the Train controller
and the training workers). Driven in headless Chromium with selenium; skipped without Chromium on a
developer's machine, a failure under CI (``CI=true``), where ``.ci/run`` installs it."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
SCREENSHOT = os.environ.get("RAYFT_DASHBOARD_SCREENSHOT")  # a path: save the job page there (the README's image)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("Chromium and chromedriver are required under CI (.ci/run installs chromium and "
                        "chromium-driver)")
        pytest.skip("needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_text(driver, needles: list[str], timeout: float = 60.0, reload_every: float = 10.0) -> str:
    """The page's visible text once it holds every needle (the dashboard polls; reload now and then)."""
    from selenium.webdriver.common.by import By

    deadline, last_load = time.monotonic() + timeout, time.monotonic()
    text = ""
    while time.monotonic() < deadline:
        text = driver.find_element(By.TAG_NAME, "body").text
        if all(n in text for n in needles):
            return text
        if time.monotonic() - last_load > reload_every:
            driver.refresh()
            last_load = time.monotonic()
        time.sleep(1)
    raise AssertionError(f"the dashboard page never showed {needles}; it shows:\n{text[:8000]}")


def sign_in(driver, timeout: float = 30.0) -> bool:
    """Ray 2.60 clusters use token authentication: the dashboard asks for the token the way it asks a user
    (a dialog), and the token is the one ``ray get-auth-token`` prints. False when no dialog came."""
    import subprocess

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fields := driver.find_elements(By.CSS_SELECTOR, "input[type=password]"):
            token = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token"], capture_output=True,
                                   text=True, check=True, timeout=60).stdout.strip().splitlines()[-1]
            fields[0].send_keys(token + Keys.ENTER)
            time.sleep(2)  # the dashboard reloads once the token is accepted
            return True
        time.sleep(0.5)
    return False


def test_submitted_job_and_its_train_run_in_the_dashboard(browser, assets, ray_local, tmp_path):
    from ray._private.worker import get_dashboard_url
    from ray.job_submission import JobStatus, JobSubmissionClient

    dashboard = "http://" + get_dashboard_url()  # the session's Ray started its dashboard there
    client = JobSubmissionClient(dashboard)
    sets = [f"model.name_or_path={assets['model']}", f"data.train={assets['train']}", f"data.eval={assets['eval']}",
            "train.max_steps=6", "train.eval_steps=6", "train.save_steps=6", "train.logging_steps=2",
            "run.name=dashboard-sft", f"run.storage_path={tmp_path / 'runs'}", f"run.registry={tmp_path / 'adapters'}",
            "run.progress=false"]
    job_id = client.submit_job(
        # this venv's python: the job's shell does not have the test's PATH (on a cluster: plain `python`)
        entrypoint=f"{sys.executable} jobs/sft.py --config configs/sft_tiny.yaml " + " ".join(f"--set {s}" for s in sets),
        runtime_env={"working_dir": str(ROOT), "excludes": [".venv", "runs", "adapters", "assets", ".git"],
                     "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        submission_id=f"rayft-dashboard-{os.getpid()}", metadata={"rayft_job": "sft"})
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job {job_id} still {status} after 300 s"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert (tmp_path / "adapters" / "dashboard-sft" / "current").exists(), logs[-2000:]

    browser.get(f"{dashboard}/#/jobs")
    sign_in(browser)
    jobs_page = wait_text(browser, [job_id])
    row = next(ln for ln in jobs_page.splitlines() if job_id in ln)
    assert "SUCCEEDED" in row or "SUCCEEDED" in jobs_page, jobs_page[:2000]

    browser.get(f"{dashboard}/#/jobs/{job_id}")
    # the job's own page: its status, its entry point, Ray's job id (the actors below carry it)
    page = wait_text(browser, [job_id, "SUCCEEDED", "jobs/sft.py", "Job ID"], timeout=90)
    ray_job_id = page.split("Job ID\n", 1)[1].split("\n", 1)[0].strip()
    assert ray_job_id and ray_job_id != "-", page[:2000]
    if SCREENSHOT:
        browser.save_screenshot(SCREENSHOT)
    # the Ray Train run it started: its training workers (and controller) among the cluster's actors
    browser.get(f"{dashboard}/#/actors")
    actors = wait_text(browser, ["RayTrainWorker", ray_job_id], timeout=90)
    assert "TrainController" in actors or "RayTrainWorker" in actors, actors[:3000]
