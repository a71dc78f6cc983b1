"""The report in a real browser: headless Chromium opens the executed notebook's HTML and the page of
``snakemake --report``; every figure must load and no notebook cell may show an error.

Each page is opened as a copy with a probe script appended, which waits for the page to load, looks
at its images (and, in Snakemake's report, opens every figure as a reader would) and writes what it
saw into the DOM that ``chromium --dump-dom`` prints. Skipped without Chromium (Debian: ``apt-get
install chromium``), unless TLSELECT_REQUIRE_BROWSER=1 (CI), which makes that a failure.
"""

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from helpers import snakemake
from PIL import Image

# The fixture ``study`` (conftest.py) is the workflow tests' tiny study: every policy, source model, probes, benchmark.

# Collects the page's own script errors, from the top of <head> on.
ERRORS = '<script>window.pageErrors = []; window.addEventListener("error", (e) => pageErrors.push(e.message));</script>'

PROBE = """<script>
window.addEventListener("load", () => setTimeout(async () => {
  const pause = (ms) => new Promise((done) => setTimeout(done, ms));
  const loaded = async (img) => {
    for (let i = 0; i < 50 && !img.complete; i++) await pause(100);
    return img.complete && img.naturalWidth > 0;
  };
  const seen = {images: [], figures: [], errors: window.pageErrors, carried: [], outputs: []};
  for (const img of document.images) seen.images.push(await loaded(img));
  const errorOutputs = '.output_error, [data-mime-type="application/vnd.jupyter.stderr"]';
  seen.outputs = [...document.querySelectorAll(errorOutputs)].map((el) => el.innerText);
  // the first of up to 100 polls, 100 ms apart, at which select() finds something (a busy machine renders late)
  const appears = async (select) => {
    for (let i = 0; i < 100; i++) {
      const found = select();
      if (found) return found;
      await pause(100);
    }
    return null;
  };
  // Snakemake's report (a React app): open each question's category, view every figure listed there
  const isReport = typeof results === "object";
  if (isReport) {
    seen.carried = Object.keys(results);
    await appears(() => document.querySelector("nav a"));
    seen.front = document.body.innerText;
    const links = [...document.querySelectorAll("nav a")].map((a) => a.textContent.trim());
    const questions = links.filter((text) => /^\\d\\. /.test(text));
    seen.categories = questions;
    for (const question of questions) {
      const menu = await appears(
        () => [...document.querySelectorAll("nav a")].find((a) => a.textContent.trim() === question));
      if (!menu) continue;
      menu.click();
      await appears(() => document.querySelector("tbody tr"));
      for (let i = 0; i < document.querySelectorAll("tbody tr").length; i++) {
        const row = document.querySelectorAll("tbody tr")[i];
        const path = row.querySelector("td").textContent.trim();
        if (!path.endsWith(".png")) continue;
        row.querySelector("a").click();
        await pause(500);
        const shown = [...document.images].find((img) => results[path] && img.src === results[path].data_uri);
        seen.figures.push({path, question, ok: shown ? await loaded(shown) : false});
      }
      // back to the list of questions: the nav's "Results" link
      const overview = [...document.querySelectorAll("nav a")].find((a) => a.textContent.trim() === "Results");
      if (overview) overview.click();
      await appears(() => [...document.querySelectorAll("nav a")].some((a) => /^\\d\\. /.test(a.textContent.trim())));
    }
  }
  // a notebook page: code shown, the first heading's section, each figure's neighbours
  seen.codeInputs = document.querySelectorAll(".jp-CodeCell .jp-InputArea, div.input_area").length;
  const cells = [...document.querySelectorAll(".jp-Cell")];
  const start = cells.findIndex((cell) => cell.querySelector("h1"));
  const section = [];
  for (let i = start; i >= 0 && i < cells.length; i++) {
    if (i > start && cells[i].querySelector("h1, h2")) break;
    section.push(cells[i].innerText);
  }
  seen.firstSection = section.join("\\n");
  const around = (el) => (el ? el.innerText.trim() : "");
  seen.figureTexts = [...document.querySelectorAll(".jp-OutputArea-output img")].map((img) => {
    const child = img.closest(".jp-OutputArea-child");
    return {before: around(child && child.previousElementSibling), after: around(child && child.nextElementSibling)};
  });
  seen.text = document.body.innerText;
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify(seen);
  document.body.append(out);
}, 0));
</script>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        message = "no headless browser: install Chromium (Debian: apt-get install chromium)"
        if os.environ.get("TLSELECT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def render(chromium: str, page: Path, folder: Path) -> dict:
    """What the probe saw in ``page`` (a copy of it in ``folder``, probe appended) in headless Chromium."""
    text = page.read_text()
    text = re.sub(r"<head[^>]*>", lambda m: m.group(0) + ERRORS, text, count=1)
    at = text.rfind("</body>")
    copy = folder / f"probed-{page.name}"
    copy.write_text(text[:at] + PROBE + text[at:])
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={folder / 'chromium'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: the notebook's CDN scripts fail at once
        "--virtual-time-budget=60000", "--dump-dom", copy.as_uri(),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', result.stdout, re.S)
    assert found, f"{page.name} never finished loading in Chromium (rc {result.returncode}):\n{result.stderr[-3000:]}"
    return json.loads(html.unescape(found.group(1)))


def shown_errors(seen: dict) -> list[str]:
    """Error outputs (tracebacks) the rendered notebook shows; warnings on stderr are no errors."""
    return [text for text in seen["outputs"] if "Traceback" in text or "Error" in text]


def selected_run(study: Path) -> str:
    runs = pd.read_csv(study / "results/tables/runs.csv")
    return runs.loc[runs["selected"], "name"].iloc[0]


def test_notebook_html_shows_every_figure_and_no_error(chromium, study, tmp_path):
    notebook = json.loads((study / "results/report/solution.ipynb").read_text())
    outputs = [output for cell in notebook["cells"] for output in cell.get("outputs", [])]
    figures = sum("image/png" in output.get("data", {}) for output in outputs)
    seen = render(chromium, study / "results/report/solution.html", tmp_path)
    assert figures >= 5 and seen["images"] == [True] * figures, seen["images"]
    assert shown_errors(seen) == [] and "Traceback" not in seen["text"]
    assert "Selected" in seen["text"] and "The largest speedup is" in seen["text"]  # the conclusions rendered


def test_notebook_html_reads_as_a_report(chromium, study, tmp_path):
    """No code and no parameter cell; the first heading's section names the selected run; every
    figure has its sentence before it and its caption (with the source table) after it."""
    seen = render(chromium, study / "results/report/solution.html", tmp_path)
    assert seen["codeInputs"] == 0
    assert "runs_csv =" not in seen["text"] and "import pandas" not in seen["text"]
    assert "Selected" in seen["firstSection"] and f"{selected_run(study)} (init" in seen["firstSection"]
    assert len(seen["figureTexts"]) >= 5
    for figure in seen["figureTexts"]:
        assert re.search(r"\d", figure["before"]) and not figure["before"].startswith("Figure"), figure
        assert re.match(r"Figure \d+: .+ Source: results/\S+\.csv\.$", figure["after"]), figure
    # the executed notebook keeps its code
    notebook = json.loads((study / "results/report/solution.ipynb").read_text())
    assert any("answer.answer(runs)" in "".join(cell["source"]) for cell in notebook["cells"])


def test_snakemake_report_shows_every_figure_and_the_notebook(chromium, study, tmp_path):
    report = tmp_path / "report.html"
    snakemake(study, "--report", str(report))
    seen = render(chromium, report, tmp_path)
    assert seen["errors"] == []
    assert f"Selected: {selected_run(study)}" in seen["front"]  # it opens on the study's answer
    assert seen["categories"][:4] == [
        "1. Which run to pick", "2. How the runs trained", "3. Which layer transfers", "4. How fast it ran"
    ]  # fmt: skip
    figures = sorted(str(path.relative_to(study)) for path in (study / "results/figures").glob("*.png"))
    assert len(figures) == 5 and sorted(f["path"] for f in seen["figures"]) == figures
    assert all(figure["ok"] for figure in seen["figures"]), seen["figures"]
    questions = {f["path"].split("/")[-1]: f["question"] for f in seen["figures"]}
    assert questions["accuracy_by_layer.png"] == "3. Which layer transfers"
    assert {"results/report/solution.html", "results/tables/runs.csv"} <= set(seen["carried"])


def png(colour: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_probe_sees_a_broken_figure_and_an_error_cell(chromium, tmp_path):
    """The checks above can fail: a figure that does not decode and a cell that raised are seen."""
    cell = nbformat.v4.new_code_cell("show()")
    cell.outputs = [
        nbformat.v4.new_output("display_data", {"image/png": png("red"), "text/plain": "fine"}),
        nbformat.v4.new_output("display_data", {"image/png": png("blue")[:40], "text/plain": "truncated"}),
        nbformat.v4.new_output("error", ename="ValueError", evalue="broken", traceback=["Traceback", "ValueError"]),
    ]
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), tmp_path / "broken.ipynb")
    jupyter = [sys.executable, "-m", "nbconvert", "--to", "html", str(tmp_path / "broken.ipynb")]
    subprocess.run(jupyter, check=True, capture_output=True, timeout=120)
    seen = render(chromium, tmp_path / "broken.html", tmp_path)
    assert seen["images"] == [True, False]
    assert seen["codeInputs"] == 1  # converted with its code: the code check sees it
    assert seen["figureTexts"][0]["before"] == ""  # a figure without its sentence is seen as such
    assert shown_errors(seen) == ["Traceback\nValueError"] and "Traceback" in seen["text"]
