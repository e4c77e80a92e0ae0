"""bench.serve's pieces that need no server: the PNG bomb is what it claims, and the Markdown table keeps one row
per load and launcher."""
from __future__ import annotations

import io

from PIL import Image

from bench import serve


def _run(hostile: bool, launcher: str, peak: int) -> dict:
    return {"hostile": hostile, "launcher": launcher, "images_per_s": 101.4,
            "latency": {"1": {"p50_ms": 61.0, "p99_ms": 240.2}, "8": {"p50_ms": 300.0, "p99_ms": 700.6},
                        "64": {"p50_ms": 1870.0, "p99_ms": 2310.0}},
            "status": {"2xx": 36, "4xx": 14 if hostile else 0, "5xx": 0, "no_answer": 0},
            "rss_mb": {"peak_vmhwm_sum": peak, "idle": 1059, "pss_peak_sampled": 1000, "pss_idle": 700,
                       "anon_peak_sampled": 950, "anon_idle": 639},
            "peak_rss_by_process_mb": {"launcher": 242, "server": peak - 242}, "server_up": True}


def test_blank_png_is_a_valid_image_of_the_size_it_claims():
    data = serve.blank_png(3000, 2000, 3)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.size, im.mode) == ((3000, 2000), "RGB")
        im.load()  # the whole deflate stream decodes: the repeated blocks and the patched checksum are valid
        assert im.getextrema() == ((0, 0),) * 3
    assert len(data) < 3000 * 2000 * 3 // 100


def test_markdown_keeps_one_row_per_load_and_launcher(tmp_path):
    path = tmp_path / "serve.md"
    serve.write_markdown(path, _run(False, "uvicorn alone", 1100))
    serve.write_markdown(path, _run(True, "mlflow models serve", 1400))
    serve.write_markdown(path, _run(True, "mlflow models serve", 1389))  # the same configuration again: replaced
    lines = path.read_text().splitlines()
    assert lines[:2] == list(serve.MARKDOWN_HEADER)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert [r[:2] for r in rows] == [["hostile stream on", "mlflow models serve"],
                                     ["hostile stream off", "uvicorn alone"]]
    assert all(len(r) == len(serve.MARKDOWN_HEADER[0].split("|")) - 2 for r in rows)
    on = dict(zip([h.strip() for h in serve.MARKDOWN_HEADER[0].split("|")[1:-1]], rows[0]))
    assert on["peak RSS (idle)"] == "1,389 MB (1,059)" and on["launcher + server peak RSS"] == "242 + 1,147 MB"
    assert on["2xx / 4xx / 5xx"] == "36 / 14 / 0" and on["64 images"] == "1.87 / 2.31 s"
    assert on["p50 / p99, 1 image"] == "61 / 240 ms" and on["up"] == "yes"
