"""``ray job submit`` as a user runs it against a cluster: a Ray head started with ``ray start`` (its own temp
dir and ports, the dashboard on loopback, token auth as Ray 2.60 sets it up), ``jobs/sft.py`` submitted with
the CLI, a runtime environment, and either ``--working-dir .`` (what `README: Run on a cluster` submits) or a
``file://`` zip of the repository (what cluster/rayjob-sft.yaml runs from). A job stopped after its first
checkpoint and submitted again resumes from that checkpoint, and the resumed job succeeds and registers.

Then the dashboard shows it, as a user sees it: headless Chromium (selenium) signs in with the cluster's token
and finds the job with its status and entry point, and the Ray Train run it started under Actors. Without
Chromium that test skips on a developer's machine and fails under CI (``CI=true``), where ``.ci/run`` installs
Debian's ``chromium`` and ``chromium-driver``.

The head is this test's own: it is stopped through its process group and the processes that name its temp
dir, never with ``ray stop`` (which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_sft_ray import _registered_checkpoint

from rayft.cluster import free_port
from rayft.runs import STATE_FILE, read_jsonl, read_metrics

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
         "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
         "ray-client-server-port")
ENDED = ("SUCCEEDED", "STOPPED", "FAILED")  # a job's final states, as the Jobs API names them
STEPS = 60  # room to stop the job between its first checkpoint (step 10) and its end
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


@dataclass
class Head:
    address: str  # the dashboard (jobs API), as RAY_ADDRESS names it for `ray job`
    tmp: Path
    env: dict  # the client's environment: RAY_AUTH_MODE=token, the venv's python first on PATH
    token: str = ""  # the cluster's auth token (`ray get-auth-token`), fetched on first use

    def job(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        command, *rest = args  # `ray job <command> --address A <rest>`
        return subprocess.run([RAY, "job", command, "--address", self.address, *rest], env=self.env,
                              capture_output=True, text=True, timeout=timeout)


    def status(self, job: str) -> str:
        """SUCCEEDED, STOPPED, FAILED, or the state of a job still under way, as `ray job status` says it."""
        p = self.job("status", job)
        final = re.search(r"Job '.*' (succeeded|was stopped|failed)", p.stdout)
        if final:
            return {"succeeded": "SUCCEEDED", "was stopped": "STOPPED", "failed": "FAILED"}[final.group(1)]
        under_way = re.search(r"Status for job '.*': (?:JobStatus\.)?(\w+)", p.stdout)
        assert under_way, f"`ray job status {job}` printed no status:\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
        return under_way.group(1)

    def api(self, method: str, path: str) -> dict:
        """The Jobs REST API the `ray job` CLI calls, with the cluster's token: answers in milliseconds, where
        each CLI call first spends seconds starting Python and importing Ray."""
        if not self.token:
            self.token = subprocess.run([RAY, "get-auth-token"], env=self.env, capture_output=True, text=True,
                                        check=True, timeout=60).stdout.strip().splitlines()[-1]
        request = urllib.request.Request(f"{self.address}{path}", method=method,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def state(self, job: str) -> str:
        """The job's status from the Jobs API (PENDING, RUNNING or one of ``ENDED``)."""
        return self.api("GET", f"/api/jobs/{job}")["status"]

    def stop(self, job: str, timeout: float = 60) -> str:
        """Stop a job at once (POST /api/jobs/<id>/stop, what `ray job stop` sends) and wait until it has ended;
        its final status."""
        self.api("POST", f"/api/jobs/{job}/stop")
        deadline = time.time() + timeout
        while (status := self.state(job)) not in ENDED:
            assert time.time() < deadline, f"job {job} still {status} {timeout:.0f} s after it was stopped"
            time.sleep(0.2)
        return status


def _own_processes(tmp: Path) -> list[int]:
    """Processes of this head: their command line or working directory names its temp dir (job drivers run in
    sessions of their own, so the process group alone misses them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(tmp) in cmd or cwd.startswith(str(tmp)):
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def head():
    tmp = Path(tempfile.mkdtemp(prefix="rayft-head-", dir="/tmp"))  # short: Ray's socket paths fit 107 bytes
    ports = {name: free_port() for name in PORTS}
    # `python` in an entrypoint is the cluster's python: here the venv's, as on a node where it is installed
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    log = (tmp / "ray-start.log").open("w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", str(tmp), "--disable-usage-stats",
         "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
         *[a for name, port in ports.items() for a in (f"--{name}", str(port))]],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(f"http://127.0.0.1:{ports['dashboard-port']}", tmp, env)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp / "ray-start.log").read_text()[-3000:]
            p = h.job("list", timeout=60)
            if p.returncode == 0:
                break
            assert time.time() < deadline, p.stdout[-2000:] + p.stderr[-2000:]
            time.sleep(1)
        yield h
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # `ray start --block` ignores SIGTERM: SIGKILL soon after
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _own_processes(tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _tiny_config(assets: dict, tmp: Path, name: str) -> Path:
    """configs/sft_tiny.yaml on the session's assets, written where the job reads it (absolute paths)."""
    cfg = yaml.safe_load((ROOT / "configs" / "sft_tiny.yaml").read_text())
    cfg["model"]["name_or_path"] = str(assets["model"])
    cfg["data"].update(train=str(assets["train"]), eval=str(assets["eval"]))
    cfg["train"].update(max_steps=STEPS, save_steps=10, eval_steps=10, logging_steps=5)
    cfg["run"] = {"name": name, "storage_path": str(tmp / "runs"), "registry": str(tmp / "adapters")}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _source_zip(dest: Path) -> Path:
    """This checkout as `git archive --prefix=rayft-src/` packs it (README: the RayJob's source zip), taken
    from the working tree: tracked and new files, without what .gitignore leaves out."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    with zipfile.ZipFile(dest, "w") as z:
        for name in filter(None, names):
            if (ROOT / name).is_file():
                z.write(ROOT / name, f"rayft-src/{name}")
    return dest


def _wait_for_checkpoint(run_dir: Path, min_step: int, job: str, h: Head, timeout: float = 240) -> None:
    deadline, next_status = time.time() + timeout, time.time() + 5
    while time.time() < deadline:
        # registered by Ray Train, not only written: a job stopped in between resumes from nothing newer
        if (_registered_checkpoint(run_dir) or 0) >= 10 and any(r["step"] >= min_step for r in read_metrics(run_dir)):
            return
        if time.time() > next_status:  # a job that failed early: say so now, not at the deadline
            if h.state(job) in ENDED:
                break
            next_status = time.time() + 5
        time.sleep(0.1)
    logs = h.job("logs", job)
    raise AssertionError(f"no checkpoint and step {min_step}:\n{logs.stdout[-4000:]}")


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(json.loads((c / STATE_FILE).read_text())["step"] for c in run_dir.glob("checkpoint_*")
                  if (c / STATE_FILE).exists())


def _progress_steps(logs: str, name: str) -> list[int]:
    # not anchored at the line's start: with RAYFT_VERBOSE=1 the workers' forwarded output shares the driver's
    # stdout, and a progress line can land after a worker's partial line
    return [int(s) for s in re.findall(rf"sft {re.escape(name)}: step (\d+)/{STEPS} ", logs)]


def test_submitted_job_stopped_after_a_checkpoint_resumes_when_submitted_again(head, assets):
    name = "submitted"
    config = _tiny_config(assets, head.tmp, name)
    run_dir = head.tmp / "runs" / name
    entry = ["--", "python", "jobs/sft.py", "--config", str(config)]
    t0 = time.time()

    # 1. the working directory uploaded from this checkout; RAYFT_VERBOSE=1 through the runtime env must reach
    # the driver (worker output forwarded to the job's logs) without failing its ray.init
    verbose = {"env_vars": {"RAYFT_VERBOSE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    p = head.job("submit", "--no-wait", "--submission-id", "sft-1", "--working-dir", str(ROOT),
                 "--runtime-env-json", json.dumps(verbose), *entry)
    assert p.returncode == 0, p.stdout + p.stderr
    _wait_for_checkpoint(run_dir, min_step=12, job="sft-1", h=head)
    # stopped through the REST API at once: `ray job stop` first spends ~8 s starting up, 20 of the run's steps
    assert head.stop("sft-1") == "STOPPED"
    assert head.status("sft-1") == "STOPPED"  # as the CLI reports it
    first = head.job("logs", "sft-1").stdout
    assert re.search(r"\(RayTrainWorker pid=\d+", first), "RAYFT_VERBOSE=1 should forward the workers' output"
    assert _progress_steps(first, name)[:3] == [0, 5, 10], first[-3000:]
    saved = _checkpoint_steps(run_dir)
    assert saved and 0 < saved[-1] < STEPS, saved
    stopped_s = time.time() - t0

    # 2. the same command from a source zip on "shared storage" (the RayJob's file:// working_dir), waiting
    quiet = {"working_dir": f"file://{_source_zip(head.tmp / 'rayft-src.zip')}",
             "env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    p = head.job("submit", "--submission-id", "sft-2", "--runtime-env-json", json.dumps(quiet), *entry)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert head.status("sft-2") == "SUCCEEDED"
    logs = head.job("logs", "sft-2").stdout
    starts = [a["start_step"] for a in read_jsonl(run_dir / "attempts.jsonl")]
    # the last checkpoint Ray Train registered before the stop (a worker may still finish writing one after it)
    resumed_at = starts[-1]
    assert starts == [0, resumed_at] and resumed_at in saved and resumed_at >= 10, (starts, saved)
    assert f"sft {name}: resumed from checkpoint at step {resumed_at}/{STEPS}" in logs, logs[-3000:]
    steps = _progress_steps(logs, name)
    assert steps and min(steps) > resumed_at and steps[-1] == STEPS, steps  # no step redone from 0
    assert "(RayTrainWorker" not in logs  # this submission's runtime env did not ask for the workers' output
    logged = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert logged == list(range(5, STEPS + 1, 5)), "each logging step exactly once across the stop and the resume"

    # 3. the artifact: registered under the run's name, from the resumed run's last step
    from rayft import artifacts

    summary = json.loads((run_dir / "summary.json").read_text())
    path, manifest = artifacts.resolve(head.tmp / "adapters", name)
    assert Path(summary["adapter"]) == path and f"adapter       : {path}" in logs
    assert manifest.kind == "adapter" and manifest.lora_rank == 16 and manifest.metrics["step"] == STEPS
    assert manifest.base_model == str(assets["model"])
    print(f"\nstopped after {stopped_s:.0f} s, resumed and finished after {time.time() - t0:.0f} s")


def test_the_submitted_job_and_its_train_run_in_the_dashboard(head, browser):
    """The resubmitted job of the test above, on the head's dashboard: its row with SUCCEEDED, its page with the
    entry point and Ray's job id, and that id on the Ray Train workers under Actors."""
    job = "sft-2"
    assert head.status(job) == "SUCCEEDED", "the job submitted by the test above"
    browser.get(f"{head.address}/#/jobs")
    sign_in(browser)
    jobs_page = wait_text(browser, [job])
    row = next(ln for ln in jobs_page.splitlines() if job in ln)
    assert "SUCCEEDED" in row or "SUCCEEDED" in jobs_page, jobs_page[:2000]

    browser.get(f"{head.address}/#/jobs/{job}")
    page = wait_text(browser, [job, "SUCCEEDED", "jobs/sft.py", "Job ID"], timeout=90)
    ray_job_id = page.split("Job ID\n", 1)[1].split("\n", 1)[0].strip()
    assert ray_job_id and ray_job_id != "-", page[:2000]
    if SCREENSHOT:
        browser.save_screenshot(SCREENSHOT)
    browser.get(f"{head.address}/#/actors")
    actors = wait_text(browser, ["RayTrainWorker", ray_job_id], timeout=90)
    assert "TrainController" in actors or "RayTrainWorker" in actors, actors[:3000]
