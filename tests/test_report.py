"""The run summary: `llavaflow report` on a results folder, its figures, and a real headless browser showing them.

The browser helpers here are also used by tests/test_pipeline.py on the whole DAG's `snakemake --report`.
"""

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import run
from processes import run_in_group

# matplotlib's default colours (tab:blue, tab:orange, tab:green): pixels of drawn lines and bars.
PLOT_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44))
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1500")


def browse(chromium, page: Path, profile: Path, *args: str, timeout: int = 180) -> str:
    """Open a page in headless chromium (fresh profile) with extra args; returns stdout. Ends only its own group."""
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=30000", *args,
           page.resolve().as_uri()]
    return run_in_group(cmd, timeout=timeout)[0]


def plot_pixels(png: Path, tolerance: int = 12) -> int:
    """How many pixels of the screenshot carry one of matplotlib's plot colours."""
    img = Image.open(png).convert("RGB")
    count = 0
    for (r, g, b), n in ((c, n) for n, c in img.getcolors(img.width * img.height)):
        if any(abs(r - pr) <= tolerance and abs(g - pg) <= tolerance and abs(b - pb) <= tolerance
               for pr, pg, pb in PLOT_COLOURS):
            count += n
    return count


# Appended to a copy of a Snakemake report: shows each named result the way its view button does
# (app.setView with the embedded data URI), waits for the image to load and records its natural size.
SHOW_RESULTS = """<script>
window.addEventListener("load", async () => {
  const names = %s, sizes = {};
  const pause = (ms) => new Promise((r) => setTimeout(r, ms));
  try {
    for (let i = 0; i < 100 && !app; i++) await pause(100);  // the React app registers itself once mounted
    for (const name of names) {
      const key = Object.keys(results).find((k) => k.endsWith(name));
      if (!key) { sizes[name] = "missing"; continue; }
      app.setView({content: "img", contentPath: results[key].data_uri, resultPath: key});
      for (let i = 0; i < 100; i++) {
        const img = [...document.images].find((im) => im.getAttribute("src") === results[key].data_uri);
        if (img && img.complete) {
          sizes[name] = [img.naturalWidth, img.naturalHeight];
          break;
        }
        await pause(100);
      }
    }
  } catch (err) {
    sizes.error = String(err);
  }
  document.body.setAttribute("data-figure-sizes", JSON.stringify(sizes));
});
</script>"""


def with_script(html: str, script: str) -> str:
    """The page with a script before its last </body> (bundled libraries hold the string too)."""
    head, tail = html.rsplit("</body>", 1)
    return head + script + "</body>" + tail


def check_snakemake_report(chromium, report: Path, figures: list[str], tmp: Path) -> dict:
    """Open a self-contained Snakemake HTML report in chromium: every figure loads with a size, and a
    screenshot of each shows plot pixels. Returns {figure: (width, height)}."""
    html = report.read_text()
    assert html.lstrip().lower().startswith("<!doctype html>") and "var results" in html
    driver = tmp / "driven_report.html"
    driver.write_text(with_script(html, SHOW_RESULTS % json.dumps(figures)))
    dom = browse(chromium, driver, tmp / "profile-dom", "--dump-dom")
    found = re.search(r'data-figure-sizes="([^"]*)"', dom)
    assert found, "the report page did not finish rendering (no data-figure-sizes on <body>)"
    sizes = json.loads(found.group(1).replace("&quot;", '"'))
    for name in figures:
        assert isinstance(sizes.get(name), list) and min(sizes[name]) > 100, (name, sizes)
    for name in figures:  # one figure on screen at a time, as a user clicking through the report sees it
        one = tmp / f"show_{name}.html"
        one.write_text(with_script(html, SHOW_RESULTS % json.dumps([name])))
        shot = tmp / f"{name}.screenshot.png"
        browse(chromium, one, tmp / f"profile-{name}", f"--screenshot={shot}")
        assert plot_pixels(shot) > 2000, f"{name}: the screenshot shows no plot"
    return sizes


def _metrics(path: Path, n: int, gpu: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(1, n + 1):
            rec = {"iter": i, "epoch": 0, "loss": 6.0 / i ** 0.5, "lr": 1e-3 * min(1, i / 5), "tokens_per_s": 900.0 + i,
                   "grad_norm": None if i % 2 else 1.0 / i, "samples_per_s": 10.0, "mean_tokens_per_sample": 60.0,
                   "model_tflops_per_s": 0.002, "elapsed_s": i * 0.1}
            if gpu:
                rec["max_memory_gib"] = 1.5 + 0.01 * i
            f.write(json.dumps(rec) + "\n")


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A results folder in Snakemake's layout: metrics of two stages, two evaluations scored by our own
    evaluator (one all right, one with a wrong rotation), a TEST set, and benchmark files."""
    from llavaflow.eval.mmbench import write_results
    from llavaflow.eval.mmbench_data import read_benchmark

    res = tmp_path_factory.mktemp("finished") / "results"
    _metrics(res / "pretrain" / "final.pth" / "metrics.jsonl", 30, gpu=False)
    _metrics(res / "finetune" / "final.pth" / "metrics.jsonl", 60, gpu=True)
    for dataset in ("MMBench_DEV_EN", "CCBench", "MMBench_TEST_EN"):
        df = read_benchmark(tiny["mmbench"] / f"{dataset}.tsv")
        preds = {int(i): (df.loc[i, "answer"] if "answer" in df else "A") for i in df.index}
        if dataset == "CCBench":
            wrong = int(df.index[df.index >= 1_000_000][0])
            preds[wrong] = next(L for L in "ABCD" if L != preds[wrong] and pd.notna(df.loc[wrong, L]))
        out = res / "mmbench" / dataset
        out.mkdir(parents=True)
        write_results(df, preds, out, dataset, "vlmevalkit-head", {"template": "phi3_chat"})
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for job, secs in (("finetune", 150.0), ("pretrain", 20.0), ("mmbench_eval/CCBench", 9.5), ("pth_to_hf", 4.0)):
        path = res / "benchmarks" / f"{job}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{secs}\t0:00:{int(secs) % 60:02d}\t812.5\t2000\t700\t710\t0\t1\t90\t{secs * 1.8}\n")
    return res


def test_report_command_summarises_a_finished_results_folder(finished, tmp_path):
    proc = run([sys.executable, "-m", "llavaflow.cli", "report", str(finished), "--out", str(tmp_path / "summary")])
    table = pd.read_csv(tmp_path / "summary" / "mmbench_summary.tsv", sep="\t").set_index("dataset")
    for dataset in ("MMBench_DEV_EN", "CCBench"):
        summary = json.loads((finished / "mmbench" / dataset / "summary.json").read_text())
        assert table.loc[dataset, "circular"] == round(summary["circular"]["Overall"], 4)
    assert table.loc["MMBench_DEV_EN", "circular"] == 1.0
    assert table.loc["CCBench", "circular"] < table.loc["CCBench", "vanilla_0"] == 1.0  # one wrong rotation
    assert pd.isna(table.loc["MMBench_TEST_EN", "circular"])
    runtimes = pd.read_csv(tmp_path / "summary" / "stage_runtimes.tsv", sep="\t")
    assert runtimes["job"].tolist() == ["pretrain", "finetune", "pth_to_hf", "mmbench_eval/CCBench"]  # DAG order
    assert runtimes["cpu_seconds"].tolist() == [36.0, 270.0, 7.2, 17.1]
    assert "MMBench_DEV_EN" in proc.stdout and "finetune" in proc.stdout
    for name in ("training_curves", "mmbench_categories", "stage_runtimes"):
        with Image.open(tmp_path / "summary" / f"{name}.png") as img:
            assert img.width > 500 and img.height > 150
        assert plot_pixels(tmp_path / "summary" / f"{name}.png") > 500, name
    html = (tmp_path / "summary" / "summary.html").read_text()
    assert html.count("src='data:image/png;base64,") == 3 and "MMBench_DEV_EN" in html


def test_report_command_default_output_is_inside_the_results_folder(finished):
    run([sys.executable, "-m", "llavaflow.cli", "report", str(finished)])
    assert (finished / "summary" / "summary.html").is_file()


def test_report_command_rejects_an_unfinished_folder(tmp_path):
    (tmp_path / "results" / "pretrain" / "final.pth").mkdir(parents=True)
    proc = run([sys.executable, "-m", "llavaflow.cli", "report", str(tmp_path / "results")], check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"llavaflow report: {tmp_path / 'results'}: not a finished results folder"), last
    assert "metrics.jsonl" in last and "summary.json" in last
    assert not (tmp_path / "results" / "summary").exists()


def test_summary_page_renders_in_headless_chromium(finished, chromium, tmp_path):
    out = tmp_path / "summary"
    run([sys.executable, "-m", "llavaflow.cli", "report", str(finished), "--out", str(out)])
    page = out / "summary.html"
    probe = tmp_path / "probe.html"  # the page plus a script recording each image's natural size once loaded
    probe.write_text(with_script(page.read_text(), """<script>
window.addEventListener("load", () => document.body.setAttribute("data-sizes",
  JSON.stringify([...document.images].map((i) => [i.alt, i.naturalWidth, i.naturalHeight]))));
</script>"""))
    dom = browse(chromium, probe, tmp_path / "profile-dom", "--dump-dom")
    sizes = json.loads(re.search(r'data-sizes="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert [s[0] for s in sizes] == ["training", "mmbench", "runtimes"] and all(min(s[1:]) > 100 for s in sizes), sizes
    shot = tmp_path / "summary.screenshot.png"
    browse(chromium, page, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert plot_pixels(shot) > 2000  # the first figure (training curves) is on screen below the tables


def test_curve_titles_count_iterations_not_logged_rows(tmp_path):
    """metrics.jsonl has a row per log interval (its mean) and per checkpoint: 40 iterations in 5 rows."""
    from llavaflow.report import training_figure

    rows = [{"iter": i, "loss": 2.0 - i / 40, "lr": 1e-3, "grad_norm": 1.0} for i in (10, 20, 25, 30, 40)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = training_figure({"pretrain": tmp_path / "metrics.jsonl"}, tmp_path / "curves.png")
    assert fig.axes[0].get_title() == "pretrain (40 iterations)"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["per logged row", "moving mean"]


def test_report_inputs_that_are_not_ours_are_named(tmp_path):
    from llavaflow.report import ReportError, mmbench_table, read_metrics, runtime_table

    (tmp_path / "summary.json").write_text('{"rows": 3}')
    with pytest.raises(ReportError, match=r"summary.json: not an evaluation summary of llavaflow mmbench \(no dataset, policy"):
        mmbench_table([tmp_path / "summary.json"])
    (tmp_path / "metrics.jsonl").write_text('{"iter": 1, "loss": 2.0}\n{"iter": 2, "lo\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: not a JSON training record"):
        read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "predictions.csv").write_text("index,prediction\n1,A\n")
    with pytest.raises(ReportError, match=r"predictions.csv: not a Snakemake benchmark file"):
        runtime_table([tmp_path / "predictions.csv"])
