"""Progress in a log file (stderr not a terminal): periodic lines with the count and the rate, and a last one."""

from __future__ import annotations

import fcos_offline.progress as progress


def test_a_log_file_gets_progress_lines_with_a_rate(monkeypatch, capsys) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line at every step
    with progress.progress_bar(3, "infer") as advance:
        for _ in range(3):
            advance(1)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert [ln.split(",")[0] for ln in lines] == ["infer: 1/3 img", "infer: 2/3 img", "infer: 3/3 img", "infer: 3/3 img"]
    assert all("img/s" in ln for ln in lines) and "s left" in lines[0] and "s left" not in lines[-1]


def test_a_short_job_logs_one_line_and_an_empty_one_none(capsys) -> None:
    with progress.progress_bar(2, "postprocess") as advance:
        advance(2)
    with progress.progress_bar(5, "nothing"):
        pass
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("postprocess: 2/2 img")
